"""A real Mosquitto broker for tests, run with the project's own ACL and passwords.

The broker listens on a free loopback port and can be stopped and restarted on the
same port (to test reconnects and buffering). Users are added with ``add_user``; the
broker reloads its password file on SIGHUP, so users can be added while it runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from support.tls import TlsFiles

ROOT = Path(__file__).resolve().parents[2]
ACL_TEMPLATE = ROOT / "examples" / "mosquitto" / "fieldtwin.acl"


def find_mosquitto() -> str:
    for candidate in (
        shutil.which("mosquitto"),
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("mosquitto is not installed; run .ci/run or 'apt-get install mosquitto'")


def find_mosquitto_passwd() -> str:
    for candidate in (shutil.which("mosquitto_passwd"), "/usr/bin/mosquitto_passwd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("mosquitto_passwd is not installed (package mosquitto)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class MosquittoBroker:
    """One broker process; ``url`` is ``mqtt://127.0.0.1:PORT``."""

    def __init__(self, workdir: Path, port: int | None = None, tls: TlsFiles | None = None) -> None:
        """With ``tls``, a second listener on ``tls_port`` speaks MQTT over TLS."""
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.passwd_file = workdir / "passwd"
        self.acl_file = workdir / "fieldtwin.acl"
        self.conf_file = workdir / "mosquitto.conf"
        self.log_file = workdir / "mosquitto.log"
        self.passwords: dict[str, str] = {}
        self._process: subprocess.Popen[bytes] | None = None
        shutil.copyfile(ACL_TEMPLATE, self.acl_file)
        self.passwd_file.write_text("")
        # Started as root, mosquitto drops to user "mosquitto", which cannot read a
        # private temp folder; telling it to stay root keeps CI containers working.
        run_as = "user root\n" if os.geteuid() == 0 else ""
        self.tls_port = free_port() if tls else None
        tls_listener = (
            f"listener {self.tls_port} 127.0.0.1\n"
            f"cafile {tls.ca_file}\ncertfile {tls.cert_file}\nkeyfile {tls.key_file}\n"
            if tls
            else ""
        )
        self.conf_file.write_text(
            run_as + "per_listener_settings false\n"
            "allow_anonymous false\n"
            f"password_file {self.passwd_file}\n"
            f"acl_file {self.acl_file}\n"
            f"listener {self.port} 127.0.0.1\n" + tls_listener + "persistence false\n"
            "max_inflight_messages 100\n"
            "max_queued_messages 100000\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            f"log_dest file {self.log_file}\n"
        )

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str:
        assert self.tls_port is not None, "this broker has no TLS listener"
        return f"mqtts://{self.host}:{self.tls_port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def add_user(self, username: str, password: str | None = None) -> str:
        """Create (or reset) a user; returns its password."""
        password = password or f"pw-{username}-{os.urandom(4).hex()}"
        subprocess.run(
            [find_mosquitto_passwd(), "-b", str(self.passwd_file), username, password],
            check=True,
            capture_output=True,
            timeout=30,
        )
        self.passwords[username] = password
        if self.running:
            assert self._process is not None
            self._process.send_signal(signal.SIGHUP)
            time.sleep(0.2)  # let the broker reload before the caller connects
        return password

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        self._process = subprocess.Popen(
            [find_mosquitto(), "-c", str(self.conf_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = self._process.stderr.read().decode() if self._process.stderr else ""
                log = self.log_file.read_text() if self.log_file.exists() else ""
                raise RuntimeError(f"mosquitto exited at start: {err}{log}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), 0.2),
            ):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {timeout}s")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()

    def kill(self) -> None:
        """Abrupt stop (SIGKILL): no clean disconnects, wills are not sent."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)
        self.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
