"""sd_notify messages arrive on a test unix datagram socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from stemd.live.notify import Notifier


@pytest.fixture
def notify_socket(tmp_path: Path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(2)
    yield path, sock
    sock.close()


def test_messages_arrive(notify_socket, monkeypatch) -> None:
    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = Notifier()
    assert n.enabled
    assert n.ready("up")
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    n.status("fps 3\nmore")
    assert sock.recv(4096) == b"STATUS=fps 3 more"
    n.status("stats: in 3", fidelity="FLAGGED ('run-1')")  # the live check's state leads the line
    assert sock.recv(4096) == b"STATUS=fidelity FLAGGED ('run-1'); stats: in 3"
    n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    n.close()


def test_abstract_address() -> None:
    name = f"stemd-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        assert Notifier("@" + name).watchdog()
        assert sock.recv(100) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_noop_when_unset(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    assert n.ready() is False


def test_unreachable_socket_does_not_raise(tmp_path: Path) -> None:
    assert Notifier(str(tmp_path / "nobody")).ready() is False


def test_watchdog_interval(monkeypatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert Notifier("").watchdog_interval() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert Notifier("").watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert Notifier("").watchdog_interval() is None


@pytest.mark.timeout(30)
def test_a_notify_socket_nobody_reads_never_blocks(tmp_path: Path) -> None:
    """A listener that never reads fills up; sends then fail at once (counted as not sent), never wait."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    n = Notifier(str(tmp_path / "notify"))
    try:
        sent = [n.status("x" * 1000) for _ in range(5000)]  # far more than a datagram queue holds
        assert sent[0] and not all(sent)
    finally:
        n.close()
        listener.close()
