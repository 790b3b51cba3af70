"""The stemd side of the tk_r_em benchmark peer: runs tk_r_em_runner.py in its own venv by subprocess.

    from bench.peers import tk_r_em_bridge
    if tk_r_em_bridge.available():
        restored, seconds = tk_r_em_bridge.restore(frames)   # (N, H, W) -> (N, H, W), N times

tk_r_em needs TensorFlow 2.12 and numpy<1.24, which cannot live beside stemd's torch and numpy,
so it is never imported here: frames travel as .npy files. Set up the venv with tk_r_em_setup.sh;
TKREM_VENV overrides its default place, <repo>/.venv-tkrem.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).resolve().with_name("tk_r_em_runner.py")
STDERR_TAIL = 2000


def default_venv() -> Path:
    """Where tk_r_em_setup.sh puts the venv: $TKREM_VENV or <repo>/.venv-tkrem."""
    return Path(os.environ.get("TKREM_VENV") or ROOT / ".venv-tkrem")


def venv_python(venv: Path | None = None) -> Path:
    """The interpreter of the tk_r_em venv."""
    return (venv or default_venv()) / "bin" / "python"


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def available(venv: Path | None = None, timeout: float = 120.0) -> bool:
    """True when the venv exists and its python imports tk_r_em (this imports TensorFlow: seconds)."""
    python = venv_python(venv)
    if not python.is_file():
        return False
    try:
        done = subprocess.run(
            [str(python), "-c", "import tk_r_em"],
            capture_output=True, env=_child_env(), timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= STDERR_TAIL else "..." + text[-STDERR_TAIL:]


def restore(
    frames: np.ndarray,
    *,
    python: Path | None = None,
    net: str = "sfr_hrstem",
    threads: int | None = None,
    timeout: float | None = None,
) -> tuple[np.ndarray, list[float]]:
    """Restore an (N, H, W) stack with tk_r_em; returns the float32 stack and wall seconds per frame.

    `python` defaults to the tk_r_em venv's interpreter. Raises ValueError for a bad stack and
    RuntimeError, with the runner's stderr tail, when the runner fails or breaks its contract.
    """
    restored, info = restore_with_info(frames, python=python, net=net, threads=threads, timeout=timeout)
    return restored, info["frame_s"]


def restore_with_info(
    frames: np.ndarray,
    *,
    python: Path | None = None,
    net: str = "sfr_hrstem",
    threads: int | None = None,
    timeout: float | None = None,
) -> tuple[np.ndarray, dict]:
    """`restore`, returning the runner's whole timing record (frame_s, frame_cpu_s, threads, ...)."""
    frames = np.asarray(frames)
    if frames.ndim != 3 or 0 in frames.shape:
        raise ValueError(f"frames: expected a non-empty (N, H, W) stack, got shape {frames.shape}")
    if not np.isfinite(frames).all():
        raise ValueError("frames: the stack holds NaN or inf")
    python = Path(python) if python is not None else venv_python()
    if not python.is_file():
        raise RuntimeError(
            f"tk_r_em peer: no interpreter at {python}; run bench/peers/tk_r_em_setup.sh "
            "(or set TKREM_VENV)"
        )
    with tempfile.TemporaryDirectory(prefix="tkrem-") as tmp:
        src, dst, times_path = Path(tmp, "frames.npy"), Path(tmp, "out.npy"), Path(tmp, "times.json")
        np.save(src, frames.astype(np.float32))
        cmd = [str(python), str(RUNNER), str(src), str(dst), str(times_path), "--net", net]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"tk_r_em peer: runner timed out after {timeout} s") from exc
        if done.returncode != 0:
            raise RuntimeError(
                f"tk_r_em peer: runner exited with status {done.returncode}; stderr tail:\n{_tail(done.stderr)}"
            )
        try:
            restored = np.load(dst, allow_pickle=False)
            info = json.loads(times_path.read_text())
            info["frame_s"] = seconds = [float(t) for t in info["frame_s"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RuntimeError(
                f"tk_r_em peer: runner left no readable output ({exc}); stderr tail:\n{_tail(done.stderr)}"
            ) from exc
    if restored.shape != frames.shape or len(seconds) != frames.shape[0]:
        raise RuntimeError(
            f"tk_r_em peer: runner returned shape {restored.shape} and {len(seconds)} times "
            f"for a stack of shape {frames.shape}"
        )
    return restored.astype(np.float32, copy=False), info
