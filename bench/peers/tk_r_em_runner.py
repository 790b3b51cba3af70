"""Run tk_r_em's sfr_hrstem network on an .npy stack; runs INSIDE the tk_r_em venv (see README.md).

    python tk_r_em_runner.py FRAMES.npy OUT.npy TIMES.json [--net sfr_hrstem] [--threads N]

FRAMES.npy is (N, H, W) float; OUT.npy gets the (N, H, W) float32 restorations and TIMES.json
{"frame_s": [...], "frame_cpu_s": [...], "warmup_s": ..., ...}: per-frame wall and process CPU
times (all threads) after one untimed warm-up frame.
No rescaling is needed: the network's first layer standardises each image by its own mean and std
and its last layer undoes it, so the output is affine-equivariant in the input (checked to 1e-6);
frames in detector counts, as tk_r_em's own test data are, are the natural input.
Imports neither stemd nor torch. Exit status 2 with one line on stderr for bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


class RunnerInputError(Exception):
    """The input stack cannot be restored (unreadable, wrong shape, not finite)."""


def load_frames(path: Path) -> np.ndarray:
    """The (N, H, W) float32 stack in `path`, or RunnerInputError naming what is wrong."""
    try:
        frames = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RunnerInputError(f"cannot read {path}: {exc}") from exc
    if frames.ndim != 3 or 0 in frames.shape:
        raise RunnerInputError(f"{path}: expected a non-empty (N, H, W) stack, got shape {frames.shape}")
    if not np.issubdtype(frames.dtype, np.number) or np.iscomplexobj(frames):
        raise RunnerInputError(f"{path}: expected real numbers, got dtype {frames.dtype}")
    frames = frames.astype(np.float32)
    if not np.isfinite(frames).all():
        raise RunnerInputError(f"{path}: the stack holds NaN or inf")
    return frames


def write_results(out_path: Path, times_path: Path, restored: np.ndarray, info: dict) -> None:
    """Save the restored stack and the timing JSON."""
    np.save(out_path, np.ascontiguousarray(restored, dtype=np.float32))
    times_path.write_text(json.dumps(info, indent=1))


def machine_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def restore_timed(frames: np.ndarray, net_name: str, threads: int) -> tuple[np.ndarray, dict]:
    """Restore each frame with tk_r_em (batch 1) and time it after one untimed warm-up frame."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    import tk_r_em

    net = tk_r_em.load_network(net_name)

    def one(frame: np.ndarray) -> np.ndarray:
        return net.predict(frame[None, :, :, None], batch_size=1)[0, :, :, 0]

    t0 = time.perf_counter()
    one(frames[0])
    warmup = time.perf_counter() - t0
    restored = np.empty_like(frames)
    frame_s, frame_cpu_s = [], []
    for i, frame in enumerate(frames):
        t0, c0 = time.perf_counter(), time.process_time()
        restored[i] = one(frame)
        frame_s.append(time.perf_counter() - t0)
        frame_cpu_s.append(time.process_time() - c0)
    info = {
        "net": net_name,
        "tensorflow": tf.__version__,
        "threads": threads,
        "shape": list(frames.shape),
        "warmup_s": warmup,
        "frame_s": frame_s,
        "frame_cpu_s": frame_cpu_s,
    }
    return restored, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("frames", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("times", type=Path)
    p.add_argument("--net", default="sfr_hrstem")
    p.add_argument("--threads", type=int, default=machine_cores())
    args = p.parse_args(argv)
    if args.threads < 1:
        print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    try:
        frames = load_frames(args.frames)
    except RunnerInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    restored, info = restore_timed(frames, args.net, args.threads)
    write_results(args.out, args.times, restored, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
