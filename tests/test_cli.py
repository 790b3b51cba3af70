"""The `stemd` command: every sub-command is wired, and user errors never show a traceback."""

import os
import subprocess
import sys

import pytest

from stemd.apps.cli import COMMANDS, build_parser, main


def test_every_command_has_help(capsys):
    parser = build_parser()
    for name in COMMANDS:
        with pytest.raises(SystemExit) as info:
            parser.parse_args([name, "--help"])
        assert info.value.code == 0
        assert "usage: stemd " + name in capsys.readouterr().out


def test_user_error_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "stemd.apps.cli", "denoise", str(tmp_path / "nope.tif"), str(tmp_path / "o.tif")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("stemd: error:")
    assert "nope.tif" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_command_is_a_usage_error(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stemd: error:") and "COMMAND" in err and err.count("\n") == 1


def test_bad_option_is_one_line_naming_it(capsys):
    assert main(["denoise", "in.tif", "out.tif", "--precision", "half"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stemd: error:") and "--precision" in err and "'bf16'" in err and err.count("\n") == 1


def test_help_and_version_import_no_sub_command():
    """`stemd --help` and `--version` import none of the sub-command modules (torch, zmq): they start at once."""
    code = (
        "import sys; from stemd.apps.cli import main\n"
        "try: main(['--version'])\nexcept SystemExit: pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'zmq', 'numpy') or "
        "m.startswith('stemd.live')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]"), out


def test_idle_openmp_threads_sleep_unless_the_user_says_otherwise():
    """Before any sub-command imports torch, OMP_WAIT_POLICY defaults to PASSIVE (a busy acquisition PC's core is
    not spun on); a value the user set is kept."""
    code = ("import os; from stemd.apps.cli import main\n"
            "try: main(['--version'])\nexcept SystemExit: pass\nprint(os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = lambda e: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e,  # noqa: E731
                                   check=True).stdout.strip().splitlines()[-1]
    assert run(env) == "PASSIVE" and run({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
