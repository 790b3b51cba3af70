"""The paper's stacked auto-encoder and its checkpoint file format.

Every model provides `denoise_frames(frames, step)` (normalised (B, 1, H, W) -> same shape) and
`arch()` (plain data that `build_model` turns back into the model). To add an architecture, write
the class and register a factory in `_REGISTRY`.

A checkpoint is one file written by `torch.save` holding only plain data and tensors:
{"format": "stemd-checkpoint", "format_version": 1, "arch": {...}, "state_dict": {name: float32
tensor}, "metadata": {...}}. It is read back with `weights_only=True`, so loading never runs code.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch

from stemd.errors import CheckpointError
from stemd.models.conv_unet import ConvDenoiser, conv_from_arch
from stemd.models.window_ae import WindowAE, window_ae_from_arch

CHECKPOINT_FORMAT = "stemd-checkpoint"
CHECKPOINT_VERSION = 1
MODELS_DIR = Path(__file__).parent  # the shipped checkpoints sit beside this module
# The default is the fully convolutional model: it won the side-by-side benchmark against the paper's
# AE (docs/benchmarks.md, "Faithfulness"); the paper's AE ships beside it as the reference.
DEFAULT_MODEL_PATH = MODELS_DIR / "conv.pt"
PAPER_AE_PATH = MODELS_DIR / "paper_ae.pt"


# A model `build_model` makes: an nn.Module that implements `stemd.models.base.FrameModel`.
Model: TypeAlias = ConvDenoiser | WindowAE

_REGISTRY: dict[str, Callable[[dict[str, Any]], Model]] = {
    "window_ae": window_ae_from_arch,
    "conv_unet": conv_from_arch,
}


def build_model(arch: object) -> Model:
    """Rebuild a model from `arch()`; raises CheckpointError for unknown architectures."""
    if not isinstance(arch, dict):
        raise CheckpointError(f"arch must be a mapping, got {type(arch).__name__}")
    name = arch.get("name")
    if name not in _REGISTRY:
        raise CheckpointError(f"unknown model architecture {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name](arch)


def _plain(value: Any, key: str) -> Any:
    """Metadata as plain data that `weights_only=True` can load (Path -> str, numpy -> Python)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"checkpoint metadata {key} is a {type(value).__name__}; only plain data can be stored")


def save_checkpoint(path: Path, model: Model, metadata: dict[str, Any]) -> None:
    """One file: format tag, version, arch, float32 weights, metadata (plain data only); atomic."""
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "arch": _plain(model.arch(), "arch"),
        "state_dict": {
            k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in model.state_dict().items()
        },
        "metadata": _plain(dict(metadata), "metadata"),
    }
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a model file is as readable as any other
        os.replace(tmp, path)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# Pickle opcodes that name or call a Python object: a pickle holding one of these can run code when loaded.
_CODE_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "INST", "OBJ"})


def _names_globals(path: Path) -> bool:
    """Whether `path` is a whole, well-formed pickle (or a torch zip around one) that names Python objects.

    Read with pickletools, which parses opcodes and never runs them. Random or truncated bytes are not one
    (an unknown opcode or no STOP raises), so they are reported as corrupt, not as code.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), None)
                if name is None:
                    return False
                data = zf.read(name)
        else:
            data = path.read_bytes()
        return any(op.name in _CODE_OPCODES for op, _, _ in pickletools.genops(data))
    except Exception:  # not a pickle: bad opcode, truncated, a broken zip
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def load_checkpoint(path: Path | None = None, map_location: str = "cpu") -> tuple[Model, dict[str, Any]]:
    """(model in eval mode, metadata); `None` loads the shipped default. weights_only=True."""
    path = DEFAULT_MODEL_PATH if path is None else Path(path)
    if not path.exists():
        hint = " (the default model is not installed; pass a checkpoint path)" if path == DEFAULT_MODEL_PATH else ""
        raise CheckpointError(f"model file {path} does not exist{hint}")
    if path.is_dir():
        raise CheckpointError(f"model path {path} is a directory, not a checkpoint file")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's weights-only unpickler says "weights only load failed" for any bytes it refuses, random
        # ones too: only a disallowed global in a real pickle is code
        if "unsupported global" in str(exc).lower() or _names_globals(path):
            raise CheckpointError(
                f"{path} holds objects other than plain data and tensors; refused, since loading it could run code"
            ) from None
        raise CheckpointError(
            f"{path} is not a readable stemd checkpoint (not a torch file, truncated or corrupt): {_first_line(exc)}"
        ) from None
    except Exception as exc:  # torch raises many kinds for bad bytes: keep the user's view to one line
        raise CheckpointError(
            f"{path} is not a readable stemd checkpoint (not a torch file, truncated or corrupt): {_first_line(exc)}"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a stemd checkpoint: it holds a {type(data).__name__}, not a dict")
    if data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a stemd checkpoint: format tag is {data.get('format')!r}")
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: invalid format_version {version!r}")
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format_version {version}, newer than this stemd reads ({CHECKPOINT_VERSION}); "
            "upgrade stemd"
        )
    try:
        model = build_model(data.get("arch"))
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: metadata must be a mapping, got {type(metadata).__name__}")
    _load_state(path, model, data.get("state_dict"))
    return model.to(map_location).eval(), metadata


def _load_state(path: Path, model: Model, state: Any) -> None:
    """Copy `state` into `model`, refusing missing/extra keys, wrong shapes and non-finite weights."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: state_dict must map names to tensors")
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{path}: weights do not match arch {model.arch()}: missing {missing or 'none'}, unexpected "
            f"{extra or 'none'}"
        )
    for key, ref in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(f"{path}: weight {key} has shape {tuple(got.shape)}, arch needs {tuple(ref.shape)}")
        if not got.is_floating_point() or not bool(torch.isfinite(got).all()):
            raise CheckpointError(f"{path}: weight {key} is not finite floating point")
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})

