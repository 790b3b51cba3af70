"""The `stemd` command: one sub-command per module, each with `add_arguments` and `run`.

Errors the user caused (`StemdError`) print as one line `stemd: error: ...` and exit 2;
everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from stemd import __version__
from stemd.errors import StemdError

# name -> (module implementing add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("stemd.apps.demo", "simulator + daemon + shipped model for a while; stats and a PNG"),
    "run": ("stemd.live.daemon", "the live denoising daemon (ZeroMQ in, ZeroMQ out)"),
    "simulate": ("stemd.apps.simulate", "publish simulated fast-scan frames like a microscope"),
    "view": ("stemd.apps.viewer", "show raw and denoised frames from a running daemon"),
    "denoise": ("stemd.apps.offline", "denoise files offline: TIFF; dm3/dm4, emd, ser, mrc, hspy (formats extra)"),
    "train": ("stemd.apps.training", "train a model on synthetic lattice windows"),
}


class UsageError(StemdError):
    """A command line argparse cannot parse: reported as one line, like every other user error."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option raises UsageError (one line, exit 2) instead of printing the usage."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `command`, only that sub-command's module is imported (the others take no options),
    so `stemd --help`, `--version` and each command start without importing the rest (torch, zmq, ...)."""
    parser = Parser(prog="stemd", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--version", action="version", version=f"stemd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command in (None, name):
            importlib.import_module(module_name).add_arguments(p)
        p.set_defaults(_module=module_name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # before any sub-command imports torch: idle OpenMP threads sleep instead of spinning on a core that the
    # microscope's own software may need (the user's own setting wins)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser = build_parser(command="")
    else:
        parser = build_parser(command=next((a for a in argv if not a.startswith("-")), ""))
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"stemd: error: {exc}", file=sys.stderr)
        return 2
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
