"""The `stemd` command: every sub-command is wired, and user errors never show a traceback."""

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
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
