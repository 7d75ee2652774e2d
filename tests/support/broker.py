"""A real Mosquitto broker for tests, configured by ``fieldtwin broker config``'s generator.

The config, ACL and password file are exactly what ``fieldtwin.hub.broker.generate``
writes for a site (docs/broker.md), from a registry of users that tests extend with
``add_user``: ``hub``, gateways, and operators (``add_user(name, role="operator")``).
The broker reloads its password and ACL files on SIGHUP, so users can be added while it
runs. Options differ from a site's only where a test needs it: a free loopback port,
no persistence, a log file, ``user root`` when the tests run as root (Mosquitto would
drop to its own user, which cannot enter a private temp folder), and — for the broker
shared by a test module — client ids not bound to usernames (``bind_client_ids=False``),
because those modules run several hubs and hub stand-ins, each with its own client id
and persistent session, against one broker. Brokers built with ``site=True`` (the broker
hardening tests, the chaos test) keep that binding, as a site does.
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

import aiomqtt

from fieldtwin.hub.broker import BrokerFiles, BrokerOptions, BrokerUser, generate, registry_users
from support.tls import TlsFiles


def find_mosquitto() -> str:
    for candidate in (
        shutil.which("mosquitto"),
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("mosquitto is not installed; run .ci/run or 'apt-get install mosquitto'")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class MosquittoBroker:
    """One broker process; ``url`` is ``mqtt://127.0.0.1:PORT``."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        tls: bool = False,
        *,
        site: bool = False,
        require_client_certs: bool = True,
        max_frame_bytes: int | None = None,
        gateways: tuple[str, ...] = (),
        operators: tuple[str, ...] = (),
    ) -> None:
        """With ``tls``, a second listener on ``tls_port`` speaks MQTT over TLS with the
        generator's CA (``tls_files``); ``site`` binds client ids to usernames."""
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.tls_port = free_port() if tls else None
        self.log_file = workdir / "mosquitto.log"
        self.options = BrokerOptions(
            port=self.port,
            bind=self.host,
            tls=tls,
            tls_port=self.tls_port or 8883,
            tls_bind=self.host,
            require_client_certs=require_client_certs,
            persistence_dir=None,
            log_file=self.log_file,
            run_as="root" if os.geteuid() == 0 else None,
            bind_client_ids=site,
        )
        if max_frame_bytes is not None:
            self.options.max_frame_bytes = max_frame_bytes
        self.roles: dict[str, str] = dict.fromkeys(gateways, "gateway")
        self.roles.update(dict.fromkeys(operators, "operator"))
        self._process: subprocess.Popen[bytes] | None = None
        self.files: BrokerFiles = self._generate()

    # -- the generated files ----------------------------------------------------------------

    def _users(self) -> list[BrokerUser]:
        return registry_users(
            [n for n, r in self.roles.items() if r == "gateway"],
            [n for n, r in self.roles.items() if r == "operator"],
            [n for n, r in self.roles.items() if r == "loadgen"],
        )

    def _generate(self) -> BrokerFiles:
        return generate(self.workdir, self._users(), self.options)

    @property
    def conf_file(self) -> Path:
        return self.files.conf

    @property
    def acl_file(self) -> Path:
        return self.files.acl

    @property
    def passwd_file(self) -> Path:
        return self.files.passwd

    @property
    def passwords(self) -> dict[str, str]:
        return self.files.passwords

    @property
    def tls_files(self) -> TlsFiles:
        files = self.files
        assert files.ca_cert is not None, "no TLS listener"
        assert files.server_cert is not None
        assert files.server_key is not None
        return TlsFiles(files.ca_cert, files.server_cert, files.server_key)

    async def gateway_session(self, gateway: str, identifier: str) -> aiomqtt.Client:
        """A connected client logged in as ``gateway`` (registered if need be) and
        subscribed to its downlink, as a test's stand-in agent uses; leave it with
        ``await client.__aexit__(None, None, None)``."""
        from fieldtwin.protocol.topics import downlink_filter

        password = self.passwords.get(gateway) or self.add_user(gateway)
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=gateway,
            password=password,
            identifier=identifier,
            timeout=10,
        )
        await client.__aenter__()
        await client.subscribe(downlink_filter(gateway), qos=1)
        return client

    def client_cert(self, user: str) -> tuple[Path, Path]:
        """(certificate, key) the generator issued for ``user``."""
        return self.files.client_certs[user]

    def add_user(self, username: str, password: str | None = None, role: str | None = None) -> str:
        """Register a user (gateway unless ``role``; ``hub`` is always there); returns
        its password. The files are generated again and a running broker reloads them."""
        if username != "hub":
            self.roles[username] = role or self.roles.get(username, "gateway")
        if password is not None:
            secret = self.workdir / "passwords" / f"{username}.password"
            secret.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            secret.write_text(password + "\n")
            secret.chmod(0o600)
        self.files = self._generate()
        if self.running:
            assert self._process is not None
            self._process.send_signal(signal.SIGHUP)
            time.sleep(0.2)  # let the broker reload before the caller connects
        return self.passwords[username]

    # -- the process -----------------------------------------------------------------------

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

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

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
