"""`stemd train`: the command line around `stemd.apps.training.loop.train`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stemd.apps.training.loop import read_state, train
from stemd.config import TrainSettings, load_train_settings
from stemd.errors import ConfigError

_OVERRIDES = ("model", "samples", "batch_size", "lr", "seed", "device", "threads", "out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `stemd train` options."""
    parser.add_argument(
        "--config", type=Path, metavar="PATH", help="YAML training settings (default: built-in, as config/train.yaml)"
    )
    parser.add_argument(
        "--model", metavar="window_ae|conv_unet", help="what to train (conv_unet: see config/train_conv.yaml)"
    )
    parser.add_argument("--samples", metavar="N", help="training windows in total")
    parser.add_argument("--batch-size", metavar="N", help="windows per optimizer step")
    parser.add_argument("--lr", metavar="X", help="Adam learning rate (peak)")
    parser.add_argument("--seed", metavar="N", help="seed for weights and data")
    parser.add_argument("--device", metavar="auto|cpu|cuda", help="where to train")
    parser.add_argument("--threads", metavar="N", help="CPU threads (0: every core)")
    parser.add_argument("--out", metavar="DIR", help="directory for best.pt, last.pt, last.state.pt")
    parser.add_argument("--hidden", metavar="W1,W2,...", help="encoder widths, e.g. 256,64 (the last is the code size)")
    parser.add_argument(
        "--resume", type=Path, metavar="CKPT", help="continue from a last.pt (its settings, unless --config)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_hidden(text: str | None) -> list[int] | None:
    """`--hidden 256,64` as a list of widths; ConfigError naming `hidden` otherwise."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"hidden: expected comma-separated integer widths like 256,64 (got {text!r})") from None


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """Config file (or, when resuming without one, the run's saved settings) plus command-line overrides."""
    overrides: dict[str, Any] = {k: getattr(args, k) for k in _OVERRIDES}
    overrides["hidden"] = _parse_hidden(args.hidden)
    if args.resume is not None and args.config is None:
        saved = read_state(args.resume)["settings"]
        overrides = {**saved, **{k: v for k, v in overrides.items() if v is not None}}
    return load_train_settings(args.config, overrides)


def command_line(args: argparse.Namespace) -> str:
    """The `stemd train ...` command these arguments amount to (stored in checkpoint metadata)."""
    parts = ["stemd", "train"]
    for key in ("config", *_OVERRIDES, "hidden", "resume"):
        value = getattr(args, key)
        if value is not None:
            parts += ["--" + key.replace("_", "-"), str(value)]
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    """`stemd train`: train, then print where the best checkpoint is and how good it is."""
    settings = settings_from_args(args)
    progress = not args.no_progress
    log = tqdm.write if progress else print
    result = train(settings, resume=args.resume, progress=progress, log=log, command=command_line(args))
    if not result.already_finished:
        q, nq = result.quality, result.noisy_quality
        print(
            f"best checkpoint {result.best_path}: validation MSE {q['mse']:.5f}, MAE {q['mae']:.4f}, "
            f"PSNR {q['psnr_db']:.2f} dB (noisy input {nq['psnr_db']:.2f} dB); "
            f"{result.samples_seen:,} samples in {result.elapsed_s:.0f} s"
        )
    return 0
