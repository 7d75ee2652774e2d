"""Pseudo-terminals standing in for serial ports, behind stable symlinks.

The simulator keeps the master side and one handle on the slave side (in raw mode, so
the line discipline never echoes or edits bytes); clients open the symlink, which points
at the slave (``/dev/pts/N``). Keeping our own slave handle open means the master does
not see a hang-up when a client closes and reopens the port.

``hangup()`` models pulling the USB adaptor: the master and slave close (a client's
next read fails), and the symlink disappears. ``open()`` afterwards creates a new pty
and points the same symlink at it, as a re-plugged adaptor would reappear.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import struct
import termios
import tty
from collections.abc import Callable
from pathlib import Path

from fieldtwin.protocol.logfmt import fields
from fieldtwin.sim.errors import EndpointError

log = logging.getLogger("fieldtwin.sim.pty")


class PtyPort:
    def __init__(self, link: Path, on_data: Callable[[bytes], None]) -> None:
        self.link = link
        self.on_data = on_data
        self.master: int | None = None
        self._slave: int | None = None
        self.pty_name = ""
        self.bytes_dropped = 0

    @property
    def is_open(self) -> bool:
        return self.master is not None

    def open(self) -> None:
        if self.master is not None:
            return
        try:
            self.link.parent.mkdir(parents=True, exist_ok=True)
            if self.link.exists() or self.link.is_symlink():
                if not self.link.is_symlink():
                    raise EndpointError(
                        f"{self.link} exists and is not a symlink; remove it or choose another link"
                    )
                log.warning("replacing stale pty link", extra=fields(link=self.link))
            master, slave = os.openpty()
        except OSError as exc:
            raise EndpointError(f"cannot create a pseudo-terminal for {self.link}: {exc}") from None
        tty.setraw(slave)
        os.set_blocking(master, False)
        name = os.ttyname(slave)
        temp = self.link.with_name(f".{self.link.name}.{os.getpid()}.tmp")
        try:
            if temp.is_symlink():
                temp.unlink()
            temp.symlink_to(name)
            os.replace(temp, self.link)
        except OSError as exc:
            os.close(master)
            os.close(slave)
            raise EndpointError(f"cannot create symlink {self.link} -> {name}: {exc}") from None
        self.master, self._slave, self.pty_name = master, slave, name
        asyncio.get_running_loop().add_reader(master, self._readable)
        log.info("pty open", extra=fields(link=self.link, pty=name))

    def _readable(self) -> None:
        if self.master is None:
            return
        try:
            data = os.read(self.master, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno == errno.EIO:  # no slave open: nothing to read
                return
            raise
        if data:
            self.on_data(data)

    def unread(self) -> int:
        """Bytes written to the port that no client has read yet."""
        if self._slave is None:
            return 0
        buf = fcntl.ioctl(self._slave, termios.FIONREAD, struct.pack("i", 0))
        return int(struct.unpack("i", buf)[0])

    def discard_unread(self) -> None:
        """Drop output nobody read, as bytes on a wire with no listener are gone."""
        if self._slave is not None:
            termios.tcflush(self._slave, termios.TCIFLUSH)

    def write(self, data: bytes) -> bool:
        """Write without blocking; bytes that do not fit are dropped (and counted)."""
        if self.master is None:
            return False
        try:
            sent = os.write(self.master, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            log.warning("pty write failed", extra=fields(link=self.link, error=exc))
            sent = 0
        if sent < len(data):
            self.bytes_dropped += len(data) - sent
        return sent == len(data)

    def hangup(self) -> None:
        """Close the pty and remove the symlink (only if it still points at our pty)."""
        if self.master is None:
            return
        asyncio.get_running_loop().remove_reader(self.master)
        try:
            if self.link.is_symlink() and os.readlink(self.link) == self.pty_name:
                self.link.unlink()
        except OSError as exc:
            log.warning("cannot remove pty link", extra=fields(link=self.link, error=exc))
        for fd in (self.master, self._slave):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.master = self._slave = None
        log.info("pty closed", extra=fields(link=self.link, pty=self.pty_name))
