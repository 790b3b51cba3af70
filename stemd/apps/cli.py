"""The `stemd` command: one sub-command per module, each with `add_arguments` and `run`.

Errors the user caused (`StemdError`) print as one line `stemd: error: ...` and exit 2;
everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from stemd import __version__
from stemd.errors import StemdError

# name -> (module implementing add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("stemd.apps.demo", "simulator + daemon + shipped model for a while; stats and a PNG"),
    "run": ("stemd.live.daemon", "the live denoising daemon (ZeroMQ in, ZeroMQ out)"),
    "simulate": ("stemd.apps.simulate", "publish simulated fast-scan frames like a microscope"),
    "view": ("stemd.apps.viewer", "show raw and denoised frames from a running daemon"),
    "denoise": ("stemd.apps.offline", "denoise a TIFF file (frame or stack) offline"),
    "train": ("stemd.apps.training", "train a model on synthetic lattice windows"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stemd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"stemd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(p)
        p.set_defaults(_module=module_name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except StemdError as exc:
        print(f"stemd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stemd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
