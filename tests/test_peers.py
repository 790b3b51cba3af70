"""The tk_r_em benchmark peer's plumbing (bench/peers), without its venv: fake interpreters stand in
for the venv's python so the subprocess/file contract is exercised, never tk_r_em's maths."""

from __future__ import annotations

import ast
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bench.peers import tk_r_em_bridge as bridge
from bench.peers import tk_r_em_runner as runner

PEERS = Path(__file__).resolve().parents[1] / "bench" / "peers"


def fake_python(tmp_path: Path, body: str) -> Path:
    """An executable standing in for the venv's python; `body` sees `argv` (sys.argv[1:]) and np."""
    path = tmp_path / "venv" / "bin" / "python"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"#!{sys.executable}\nimport json, os, sys\nimport numpy as np\nargv = sys.argv[1:]\n"
        + textwrap.dedent(body)
    )
    path.chmod(0o755)
    return path


# A runner that honours the contract: read argv[1], write 2x+1 to argv[2] and times to argv[3].
HONEST = textwrap.dedent("""
    runner, src, dst, times = argv[:4]
    assert os.path.isfile(runner) and runner.endswith("tk_r_em_runner.py"), runner
    assert "PYTHONPATH" not in os.environ
    x = np.load(src)
    np.save(dst, 2 * x + 1)
    json.dump({"frame_s": [0.5 + i for i in range(len(x))], "argv": argv[4:]}, open(times, "w"))
""")


def test_available_is_false_for_a_missing_venv(tmp_path: Path) -> None:
    assert bridge.available(tmp_path / "no-such-venv") is False


def test_available_asks_the_venv_to_import_tk_r_em(tmp_path: Path) -> None:
    fake_python(tmp_path, "sys.exit(0 if argv == ['-c', 'import tk_r_em'] else 1)")
    assert bridge.available(tmp_path / "venv") is True
    fake_python(tmp_path, "sys.exit('ModuleNotFoundError: No module named tk_r_em')")
    assert bridge.available(tmp_path / "venv") is False


def test_default_venv_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TKREM_VENV", str(tmp_path / "v"))
    assert bridge.venv_python() == tmp_path / "v" / "bin" / "python"
    monkeypatch.delenv("TKREM_VENV")
    assert bridge.default_venv() == PEERS.parents[1] / ".venv-tkrem"


def test_restore_without_a_venv_says_how_to_set_it_up(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="tk_r_em_setup.sh"):
        bridge.restore(np.zeros((1, 8, 8), np.float32), python=tmp_path / "missing" / "python")


def test_restore_round_trips_frames_and_times_through_the_runner_contract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    python = fake_python(tmp_path, HONEST)
    frames = np.random.default_rng(0).normal(size=(3, 6, 10))
    out, seconds = bridge.restore(frames, python=python, threads=3)
    assert out.dtype == np.float32 and out.shape == frames.shape
    np.testing.assert_allclose(out, 2 * frames.astype(np.float32) + 1, rtol=1e-6)
    assert seconds == [0.5, 1.5, 2.5]
    _, info = bridge.restore_with_info(frames, python=python)
    assert info["frame_s"] == seconds and info["argv"] == ["--net", "sfr_hrstem"]


def test_restore_passes_net_and_threads_to_the_runner(tmp_path: Path) -> None:
    python = fake_python(
        tmp_path,
        HONEST + "\nassert argv[4:] == ['--net', 'sfr_lrstem', '--threads', '3'], argv\n",
    )
    bridge.restore(np.ones((1, 4, 4)), python=python, net="sfr_lrstem", threads=3)


def test_a_failing_runner_raises_with_its_stderr_tail(tmp_path: Path) -> None:
    python = fake_python(tmp_path, "sys.stderr.write('x' * 10000 + 'ValueError: the real cause\\n'); sys.exit(3)")
    with pytest.raises(RuntimeError) as info:
        bridge.restore(np.ones((2, 4, 4)), python=python)
    message = str(info.value)
    assert "status 3" in message and "ValueError: the real cause" in message
    assert len(message) < bridge.STDERR_TAIL + 200


@pytest.mark.parametrize(
    "body, expected",
    [
        ("pass", "no readable output"),
        ("np.save(argv[2], np.zeros((1, 2, 2)))\njson.dump({'frame_s': [1.0, 1.0]}, open(argv[3], 'w'))", "shape"),
        ("np.save(argv[2], np.load(argv[1]))\njson.dump({'frame_s': [1.0]}, open(argv[3], 'w'))", "1 times"),
        ("np.save(argv[2], np.load(argv[1]))\nopen(argv[3], 'w').write('{not json')", "no readable output"),
    ],
)
def test_a_runner_that_breaks_the_contract_is_caught(tmp_path: Path, body: str, expected: str) -> None:
    python = fake_python(tmp_path, body)
    with pytest.raises(RuntimeError, match=expected):
        bridge.restore(np.ones((2, 4, 4)), python=python)


def test_a_hung_runner_times_out(tmp_path: Path) -> None:
    python = fake_python(tmp_path, "import time; time.sleep(30)")
    with pytest.raises(RuntimeError, match="timed out"):
        bridge.restore(np.ones((1, 4, 4)), python=python, timeout=0.5)


@pytest.mark.parametrize("frames", [np.ones((4, 4)), np.ones((0, 4, 4)), np.full((1, 4, 4), np.nan)])
def test_restore_rejects_a_bad_stack_before_starting_the_runner(tmp_path: Path, frames: np.ndarray) -> None:
    python = fake_python(tmp_path, "sys.exit('the runner must not start')")
    with pytest.raises(ValueError, match="frames"):
        bridge.restore(frames, python=python)


def test_runner_loads_a_stack_as_float32(tmp_path: Path) -> None:
    np.save(tmp_path / "f.npy", np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    frames = runner.load_frames(tmp_path / "f.npy")
    assert frames.dtype == np.float32 and frames.shape == (2, 3, 4) and frames[1, 2, 3] == 23


@pytest.mark.parametrize(
    "content, expected",
    [
        (np.ones((3, 4)), "shape"),
        (np.full((1, 3, 4), np.inf), "NaN or inf"),
        (np.full((1, 2, 2), "a"), "real numbers"),
        (None, "cannot read"),
    ],
)
def test_runner_rejects_bad_input_with_exit_2_before_loading_tensorflow(
    tmp_path: Path, capsys: pytest.CaptureFixture, content, expected: str
) -> None:
    src = tmp_path / "f.npy"
    if content is None:
        src.write_bytes(b"not an npy file")
    else:
        np.save(src, content)
    assert runner.main([str(src), str(tmp_path / "o.npy"), str(tmp_path / "t.json")]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()


def test_runner_writes_what_the_bridge_reads(tmp_path: Path) -> None:
    restored = np.random.default_rng(1).normal(size=(2, 3, 3))
    runner.write_results(tmp_path / "o.npy", tmp_path / "t.json", restored, {"frame_s": [1.0, 2.0]})
    np.testing.assert_allclose(np.load(tmp_path / "o.npy"), restored.astype(np.float32))
    assert json.loads((tmp_path / "t.json").read_text())["frame_s"] == [1.0, 2.0]


def test_runner_imports_neither_stemd_nor_torch() -> None:
    tree = ast.parse((PEERS / "tk_r_em_runner.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert names and not names & {"stemd", "torch"}
