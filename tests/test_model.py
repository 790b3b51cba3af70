"""WindowAE shape/arch, the model registry and the checkpoint file format."""

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from stemd.errors import CheckpointError
from stemd.models.checkpoint import CHECKPOINT_FORMAT, build_model, load_checkpoint, save_checkpoint
from stemd.models.window_ae import WindowAE


def _model(hidden=(32, 8), seed=0) -> WindowAE:
    torch.manual_seed(seed)
    return WindowAE(28, hidden).eval()


def test_window_ae_layers_shapes_and_arch():
    model = WindowAE(28, (256, 64))
    assert [(lin.in_features, lin.out_features) for lin in model.linear_layers()] == [
        (784, 256),
        (256, 64),
        (64, 256),
        (256, 784),
    ]
    assert sum(isinstance(m, torch.nn.ReLU) for m in model.net) == 3
    assert model.arch() == {"name": "window_ae", "window": 28, "hidden": [256, 64]}
    x = torch.rand(5, 784)
    assert model(x).shape == (5, 784)
    torch.testing.assert_close(model(x.view(5, 1, 28, 28)), model(x).view(5, 1, 28, 28))


def test_build_model_round_trips_arch_and_refuses_unknown():
    model = build_model({"name": "window_ae", "window": 20, "hidden": [30, 10]})
    assert isinstance(model, WindowAE) and model.arch() == {"name": "window_ae", "window": 20, "hidden": [30, 10]}
    with pytest.raises(CheckpointError, match="unknown model architecture 'unet'"):
        build_model({"name": "unet"})
    with pytest.raises(CheckpointError, match="hidden"):
        build_model({"name": "window_ae", "window": 28, "hidden": []})


def test_checkpoint_round_trip(tmp_path: Path):
    model = _model()
    meta = {"step": 3, "period_px": 10.0, "noise": {"kind": "uniform", "snr": 0.33}, "command": ["stemd", "train"],
            "out": tmp_path, "score": np.float32(0.5)}
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, meta)
    assert os.listdir(tmp_path) == ["m.pt"]  # no temp file left behind
    loaded, got = load_checkpoint(path)
    assert not loaded.training and loaded.arch() == model.arch()
    assert got == {"step": 3, "period_px": 10.0, "noise": {"kind": "uniform", "snr": 0.33},
                   "command": ["stemd", "train"], "out": str(tmp_path), "score": 0.5}
    x = torch.rand(4, 784)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and raw["format_version"] == 1
    assert all(t.dtype == torch.float32 for t in raw["state_dict"].values())


def test_save_refuses_non_plain_metadata(tmp_path: Path):
    with pytest.raises(TypeError, match="metadata.bad"):
        save_checkpoint(tmp_path / "m.pt", _model(), {"bad": object()})
    with pytest.raises(CheckpointError, match="cannot write"):
        save_checkpoint(tmp_path / "missing-dir" / "m.pt", _model(), {})


def _write(tmp_path: Path, payload) -> Path:
    path = tmp_path / "ck.pt"
    torch.save(payload, path)
    return path


def _good_payload() -> dict:
    model = _model()
    return {"format": CHECKPOINT_FORMAT, "format_version": 1, "arch": model.arch(),
            "state_dict": dict(model.state_dict()), "metadata": {}}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: p.update(format="something-else"), "format tag"),
        (lambda p: p.update(format_version=2), "newer"),
        (lambda p: p.update(format_version="1"), "format_version"),
        (lambda p: p.update(arch={"name": "unet"}), "unknown model architecture"),
        (lambda p: p["state_dict"].pop("net.0.weight"), "missing \\['net.0.weight'\\]"),
        (lambda p: p["state_dict"].update(extra=torch.zeros(1)), "unexpected \\['extra'\\]"),
        (lambda p: p["state_dict"].update({"net.0.bias": torch.zeros(31)}), "shape \\(31,\\)"),
        (lambda p: p["state_dict"].update({"net.0.bias": torch.full((32,), float("nan"))}), "not finite"),
        (lambda p: p.update(arch={"name": "window_ae", "window": 28, "hidden": [64, 8]}), "shape"),
        (lambda p: p.update(metadata=[1, 2]), "metadata"),
    ],
)
def test_bad_checkpoint_contents_raise_checkpoint_error(tmp_path, mutate, message):
    payload = _good_payload()
    mutate(payload)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_write(tmp_path, payload))


def test_bad_checkpoint_files_raise_checkpoint_error(tmp_path: Path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a torch file at all")
    with pytest.raises(CheckpointError, match="not a readable stemd checkpoint"):
        load_checkpoint(junk)
    good = tmp_path / "good.pt"
    save_checkpoint(good, _model(), {})
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable stemd checkpoint"):
        load_checkpoint(truncated)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(data[:100] + bytes(200) + data[300:])
    with pytest.raises(CheckpointError):
        load_checkpoint(corrupt)
    with pytest.raises(CheckpointError, match="holds a list"):
        load_checkpoint(_write(tmp_path, [1, 2, 3]))


def test_pickled_code_is_refused(tmp_path: Path):
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "x": Fraction(1, 3)}, path)  # an arbitrary class: needs unpickling code
    with pytest.raises(CheckpointError, match="refused, since loading it could run code"):
        load_checkpoint(path)


def test_denoise_frames_keeps_shape():
    model = _model(hidden=(16, 4))
    with torch.inference_mode():
        assert model.denoise_frames(torch.rand(2, 1, 33, 41), 3).shape == (2, 1, 33, 41)


def test_checkpoint_permissions_follow_the_umask(tmp_path) -> None:
    import os
    import stat

    from stemd.models.checkpoint import save_checkpoint
    from stemd.models.window_ae import WindowAE

    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "m.pt", WindowAE(28, (8, 4)), {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.pt").stat().st_mode) == 0o644


def test_random_bytes_are_corrupt_not_code(tmp_path: Path):
    """Random bytes make torch's weights-only unpickler fail ("Unsupported operand"): that is a corrupt file,
    never "could run code" (which it was reported as)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "random.pt"
    for i in range(30):
        head = b"\x80\x02" if i % 2 else b""  # half of them start like a pickle
        path.write_bytes(head + rng.integers(0, 256, 1000 + 37 * i, dtype=np.uint8).tobytes())
        with pytest.raises(CheckpointError, match="corrupt") as err:
            load_checkpoint(path)
        assert "could run code" not in str(err.value)


@pytest.mark.parametrize("protocol", [2, 4])
def test_plain_pickle_naming_a_global_could_run_code(tmp_path: Path, protocol: int):
    """A real pickle (not a torch file) naming a class is refused as code, whatever its pickle protocol."""
    import pickle

    path = tmp_path / "pickled.pt"
    path.write_bytes(pickle.dumps({"format": CHECKPOINT_FORMAT, "x": Fraction(1, 3)}, protocol=protocol))
    with pytest.raises(CheckpointError, match="refused, since loading it could run code"):
        load_checkpoint(path)
