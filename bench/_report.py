"""Shared by the bench scripts: the machine line, section-wise updates of docs/benchmarks.md, and the
NAME=PATH[@OPTIONS] model option."""

from __future__ import annotations

import argparse
import os
import platform
import re
from pathlib import Path

import torch

from stemd.config import DEJITTER_MAX
from stemd.pipeline import PRECISIONS

ROOT = Path(__file__).resolve().parents[1]  # the repository
BENCHMARKS = ROOT / "docs" / "benchmarks.md"  # where the bench scripts write their sections
HEADER = "# Benchmarks\n\nEvery figure here is written by a script in `bench/`; rerun it to reproduce.\n"


def machine_line() -> str:
    """CPU model, cores, and the GPU if one is present: the machine a figure was measured on."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    else:
        text += ", no GPU"
    return text


SUMMARY = "Summary"  # docs/benchmarks.md's first section, written by hand from the sections after it


def write_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the `## title` section of a markdown file, keeping the other sections.

    A section is replaced where it stands and a new one goes at the end, so the order is kept and the
    hand-written `## Summary` at the top stays first; no script may write the summary itself."""
    if title == SUMMARY:
        raise ValueError(f"the {SUMMARY} section of {path.name} is written by hand, not by a bench script")
    text = path.read_text() if path.exists() else HEADER
    block = f"## {title}\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    path.write_text(text)


def publish(text: str, path: Path, title: str, write: bool = True) -> None:
    """Print a bench script's markdown and, unless told not to, put it in its section of `path`."""
    print(text)
    if write:
        write_section(path, title, text)
        print(f"wrote {path}")


def model_option(text: str) -> tuple[str, Path, dict]:
    """--model NAME=PATH[@OPT[+OPT]] -> (name, path, Denoiser options); OPT is a precision, `flips`,
    `dejitterN` (N rounds of line-jitter correction; dejitter0: off), `noplanar` (the Bragg guide everywhere),
    `nokeep` (the guide does not step aside at point defects) or `norecover` (the residual is not put back)."""
    name, sep, rest = text.partition("=")
    path, _, suffix = rest.rpartition("@") if "@" in rest else (rest, "", "")
    options: dict = {}
    for opt in filter(None, suffix.split("+")):
        if opt in PRECISIONS:
            options["precision"] = opt
        elif opt == "flips":
            options["flips"] = True
        elif opt == "noplanar":
            options["planar"] = False
        elif opt == "nokeep":
            options["keep_defects"] = False
        elif opt == "norecover":
            options["recover"] = False
        elif opt.startswith("dejitter") and opt[8:].isdigit() and int(opt[8:]) <= DEJITTER_MAX:
            options["dejitter"] = int(opt[8:])
        else:
            path = ""
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(
            f"expected NAME=PATH[@{'|'.join(PRECISIONS)}|flips|dejitterN|noplanar|nokeep|norecover[+...]], got {text!r}"
        )
    return name, Path(path), options
