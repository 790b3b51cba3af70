"""Minimal sd_notify: tell systemd READY/STATUS/WATCHDOG/STOPPING over $NOTIFY_SOCKET.

No dependency; every call is a no-op when the daemon is not run by systemd (variable unset).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """One datagram socket to systemd's notify socket (abstract '@name' addresses too)."""

    def __init__(self, address: str | None = None) -> None:
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self.address = "\0" + address[1:] if address and address.startswith("@") else address
        self._sock: socket.socket | None = None
        self._warned = False
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)  # a notify socket nobody reads must never stall the event loop

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC, or None when not asked."""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0 or (pid.isdigit() and int(pid) != os.getpid()):
            return None
        return int(usec) / 2e6

    def notify(self, *fields: str) -> bool:
        """Send "KEY=value" lines in one datagram; False (logged once) if it could not be sent, a full socket
        included (the message is dropped: a later STATUS= replaces it)."""
        if self._sock is None or not self.address:  # the socket exists only for an address
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError as exc:
            if not self._warned:
                log.warning("sd_notify to %r failed: %s", self.address, exc)
                self._warned = True
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str, fidelity: str | None = None) -> bool:
        """STATUS= one line; `fidelity` (the live check's state: ok, FLAGGED …, waiting, off) leads it, so a
        cut line (systemctl status) still shows it."""
        line = text if fidelity is None else f"fidelity {fidelity}; {text}"
        return self.notify(f"STATUS={line.replace(chr(10), ' ')}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
