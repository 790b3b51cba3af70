"""The service unit: Type=notify with a watchdog, and the hardening an operator expects of a lab service."""

from pathlib import Path

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "stemd.service"


def _directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_unit_notifies_watches_and_bounds_the_daemon():
    d = _directives()
    assert d["Type"] == ["notify"] and d["WatchdogSec"] and d["ExecReload"]
    for key in ("SystemCallFilter", "ProtectProc", "RemoveIPC", "LimitNOFILE", "MemoryMax", "TasksMax",
                "NoNewPrivileges", "ProtectSystem", "DevicePolicy"):
        assert key in d, key
    assert d["SystemCallFilter"] == ["@system-service"] and d["ProtectProc"] == ["invisible"]
    assert "OMP_WAIT_POLICY=PASSIVE" in d["Environment"]
    assert "MemoryDenyWriteExecute" not in d  # PyTorch and the CUDA driver JIT-compile code


def test_sigterm_finishes_inside_the_units_stop_timeout():
    """The daemon's own stop deadline (queue.stop_timeout_s) plus the interpreter's exit fit in TimeoutStopSec."""
    from stemd.config import Settings

    stop = Settings().queue.stop_timeout_s
    assert stop + 5.0 <= float(_directives()["TimeoutStopSec"][0])
