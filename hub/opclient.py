"""The operator's side of the operator channel: a signed client of the hub over the broker.

Used by ``fieldtwin cmd ...``, ``fieldtwin twin alarms ...`` and the console. It works
from any machine that reaches the broker: nothing here opens the hub's database.

- Identity: the operator's Ed25519 key (``fieldtwin keys new alice``); every request is
  a signed ``op_req`` frame with a fresh nonce (``req_id``) and a short expiry.
- Broker login: the operator's own MQTT user (its id), password and TLS settings; the
  broker ACL lets it write only ``ft/v1/op/{id}/req`` and read only its replies and the
  hub's views.
- Trust: the hub's public key is pinned. Every answer (and every view) must verify
  against it, be addressed to this operator and answer this request, or it is ignored.

A profile (TOML) holds the settings; ``fieldtwin demo`` writes one per demo operator::

    [operator]
    id = "alice"
    key = "keys/alice.key"          # private key, mode 0600
    hub_key = "keys/hub.pub"        # the hub's public key (pinned)

    [broker]
    url = "mqtt://127.0.0.1:1883"   # mqtts:// for TLS
    username = "alice"              # default: the operator id
    password_file = "keys/alice.password"
    ca_file = "ca.crt"              # TLS: the CA that signed the broker's certificate
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from fieldtwin.hub.config import parse_broker_url
from fieldtwin.hub.errors import HubError
from fieldtwin.protocol.aio import within
from fieldtwin.protocol.approvals import command_digest, sign_approval
from fieldtwin.protocol.config import ConfigError, load_toml
from fieldtwin.protocol.errors import ProtocolError
from fieldtwin.protocol.frames import FrameSigner, decode_frame
from fieldtwin.protocol.keys import (
    KeyPair,
    KeyRegistry,
    PublicKey,
    load_private_key,
    load_public_key,
)
from fieldtwin.protocol.messages import OperatorRequest, OperatorResponse, View
from fieldtwin.protocol.topics import (
    VIEW_PREFIX,
    operator_request_topic,
    operator_response_topic,
)

REQUEST_TTL_S = 60.0


class OperatorError(HubError):
    """The hub refused a request (``code`` says why in a word) or did not answer."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class OperatorProfile:
    operator: str
    key_file: Path
    hub_key_file: Path
    broker_url: str
    username: str
    password: str | None = None
    ca_file: Path | None = None
    timeout_s: float = 15.0

    @classmethod
    def load(cls, path: Path | str) -> OperatorProfile:
        root = load_toml(path)
        section = root.section("operator", required=True)
        operator = section.text("id")
        key_file = section.path("key")
        hub_key_file = section.path("hub_key")
        timeout = section.number("timeout_s", 15.0, min=0.5, max=600)
        section.finish()
        broker = root.section("broker", required=True)
        url = broker.text("url")
        parse_broker_url(url, broker)
        profile = cls(
            operator=operator,
            key_file=key_file,
            hub_key_file=hub_key_file,
            broker_url=url,
            username=broker.text("username", operator),
            password=broker.secret_file("password_file")
            if broker.has("password_file")
            else broker.text("password", None, allow_empty=True),
            ca_file=broker.path("ca_file", None),
            timeout_s=timeout,
        )
        broker.finish()
        root.finish()
        return profile

    def key(self) -> KeyPair:
        return load_private_key(self.key_file)

    def hub_key(self) -> PublicKey:
        return load_public_key(self.hub_key_file)


class OperatorClient:
    """One connection to the broker as one operator; ``request`` is one signed round trip."""

    def __init__(self, profile: OperatorProfile) -> None:
        self.profile = profile
        self.key = profile.key()
        self.signer = FrameSigner(profile.operator, self.key)
        self.hub = KeyRegistry.of({"hub": profile.hub_key()})
        self.epoch = int(time.time() * 1000)
        self.seq = 0
        self.client: aiomqtt.Client | None = None
        self._waiting: dict[str, asyncio.Future[OperatorResponse]] = {}
        self._views: asyncio.Queue[View] = asyncio.Queue(10_000)
        self._reader: asyncio.Task[None] | None = None
        self.rejected = 0
        """Frames on our topics that did not verify against the pinned hub key."""
        self.views_dropped = 0

    @contextlib.asynccontextmanager
    async def connected(self, *, views: bool = False) -> AsyncIterator[OperatorClient]:
        profile = self.profile
        host, port, tls = parse_broker_url(profile.broker_url)
        tls_params = None
        if tls:
            tls_params = aiomqtt.TLSParameters(
                ca_certs=str(profile.ca_file) if profile.ca_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        client = aiomqtt.Client(
            host,
            port,
            username=profile.username,
            password=profile.password,
            identifier=f"{profile.operator}-{secrets.token_hex(4)}",
            clean_session=True,
            keepalive=15,
            timeout=profile.timeout_s,
            tls_params=tls_params,
        )
        try:
            async with client:
                await client.subscribe(operator_response_topic(profile.operator), qos=1)
                if views:
                    await client.subscribe(f"{VIEW_PREFIX}/#", qos=0)
                self.client = client
                self._reader = asyncio.create_task(self._read(client), name="operator-reader")
                try:
                    yield self
                finally:
                    self._reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._reader
                    self.client = None
        except aiomqtt.MqttError as exc:
            raise OperatorError(
                f"cannot reach the broker at {profile.broker_url} as {profile.username}: {exc}",
                code="unavailable",
            ) from None

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                continue
            try:
                frame = decode_frame(bytes(payload), self.hub)
            except ProtocolError:
                self.rejected += 1
                continue
            body = frame.body
            if isinstance(body, OperatorResponse):
                if body.to != self.profile.operator:
                    self.rejected += 1
                    continue
                waiter = self._waiting.pop(body.req_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(body)
            elif isinstance(body, View):
                try:
                    self._views.put_nowait(body)
                except asyncio.QueueFull:
                    self.views_dropped += 1

    async def views(self) -> AsyncIterator[View]:
        while True:
            yield await self._views.get()

    async def request(
        self, op: str, args: Mapping[str, Any] | None = None, *, timeout_s: float | None = None
    ) -> Any:
        """Send one signed request and wait for its verified answer; raise OperatorError."""
        client = self.client
        if client is None:
            raise OperatorError("not connected to the broker", code="unavailable")
        now = int(time.time() * 1000)
        req_id = secrets.token_hex(12)
        body = OperatorRequest(req_id, now + int(REQUEST_TTL_S * 1000), op, dict(args or {}))
        self.seq += 1
        frame = self.signer.encode(self.epoch, self.seq, now, body)
        waiter: asyncio.Future[OperatorResponse] = asyncio.get_running_loop().create_future()
        self._waiting[req_id] = waiter
        try:
            await client.publish(operator_request_topic(self.profile.operator), frame, qos=1)
            answer = await within(timeout_s or self.profile.timeout_s, waiter)
        except TimeoutError:
            raise OperatorError(
                f"the hub did not answer {op} within {timeout_s or self.profile.timeout_s:g} s "
                f"(is it running, and connected to {self.profile.broker_url}?)",
                code="unavailable",
            ) from None
        except aiomqtt.MqttError as exc:
            raise OperatorError(f"broker connection lost: {exc}", code="unavailable") from None
        finally:
            self._waiting.pop(req_id, None)
        if not answer.ok:
            raise OperatorError(answer.error or answer.code, code=answer.code)
        return answer.result

    # -- commands ---------------------------------------------------------------------------

    def approval_for(self, command: Mapping[str, Any]) -> dict[str, Any]:
        """Sign the digest of what ``command`` (as the hub showed it) writes and restores.

        The digest is computed here from the fields shown, and must equal the hub's: an
        approval then provably covers what the operator saw, nothing else."""
        rollback_of = command.get("rollback_of")
        if rollback_of:
            digest = command_digest(
                rollback_of,
                command["gateway"],
                command["entity"],
                command["attribute"],
                command.get("rollback_from"),
                command["value"],
            )
        else:
            checkpoint = command.get("checkpoint") or {}
            digest = command_digest(
                command["id"],
                command["gateway"],
                command["entity"],
                command["attribute"],
                command["value"],
                checkpoint.get("value"),
            )
        if digest.hex() != command.get("digest"):
            raise OperatorError(
                f"{command['id']}: the hub's digest does not match the command it shows; "
                "refusing to sign",
                code="invalid",
            )
        approval = sign_approval(self.profile.operator, self.key, digest)
        return {"cmd_id": command["id"], "signature": approval.signature, "key_id": approval.key_id}


def profile_from(
    *,
    profile: Path | None,
    hub_config: Path | None,
    operator: str | None,
    key: Path | None,
    password_file: Path | None,
    broker: str | None,
) -> OperatorProfile:
    """An operator profile from a profile file, or from a hub config plus key options.

    Order: ``--profile`` / ``$FIELDTWIN_PROFILE``; else the hub config (``-c`` or a demo's
    ``--state-dir``) gives the broker URL and the hub's key, and the operator's key comes
    from ``--key`` / ``$FIELDTWIN_OPERATOR_KEY`` (its file name, without ``.key``, is the
    operator id unless ``--operator`` says otherwise).
    """
    env_profile = os.environ.get("FIELDTWIN_PROFILE")
    if profile is None and env_profile:
        profile = Path(env_profile)
    if profile is not None:
        loaded = OperatorProfile.load(profile)
        if key is not None or operator is not None:
            loaded = OperatorProfile(
                operator=operator or loaded.operator,
                key_file=key or loaded.key_file,
                hub_key_file=loaded.hub_key_file,
                broker_url=broker or loaded.broker_url,
                username=operator or loaded.username,
                password=loaded.password,
                ca_file=loaded.ca_file,
                timeout_s=loaded.timeout_s,
            )
        return loaded
    if hub_config is None:
        raise OperatorError(
            "say who you are: --profile FILE (or $FIELDTWIN_PROFILE), or -c HUB.toml / "
            "--state-dir DIR with --key FILE (or $FIELDTWIN_OPERATOR_KEY)",
            code="invalid",
        )
    from fieldtwin.hub.config import load_hub_config

    config = load_hub_config(hub_config)
    env_key = os.environ.get("FIELDTWIN_OPERATOR_KEY")
    key = key or (Path(env_key) if env_key else None)
    if key is None and operator is not None:
        key = config.key_file.parent / f"{operator}.key"
    if key is None:
        raise OperatorError(
            "no operator key: give --key FILE (or set $FIELDTWIN_OPERATOR_KEY), or --operator "
            f"NAME to use {config.key_file.parent}/NAME.key",
            code="invalid",
        )
    operator = operator or key.name.removesuffix(".key")
    if operator not in config.operators:
        known = ", ".join(sorted(config.operators)) or "none"
        raise OperatorError(
            f"{operator} (key {key}) is not an operator of {config.file} (operators: {known})",
            code="unknown_operator",
        )
    hub_pub = config.key_file.with_suffix(".pub")
    password = None
    if password_file is None:
        candidate = key.with_name(f"{operator}.password")
        env_password = os.environ.get("FIELDTWIN_BROKER_PASSWORD_FILE")
        password_file = (
            Path(env_password) if env_password else (candidate if candidate.exists() else None)
        )
    if password_file is not None:
        try:
            password = password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                password_file, "", f"cannot read the broker password: {exc}"
            ) from None
    return OperatorProfile(
        operator=operator,
        key_file=key,
        hub_key_file=hub_pub,
        broker_url=broker or config.broker.url,
        username=operator,
        password=password,
        ca_file=None,
    )


def write_profile(path: Path, profile: OperatorProfile, password_file: Path | None) -> None:
    """Write a profile file (TOML) for ``profile`` (used by the demo)."""
    import tomli_w

    broker: dict[str, Any] = {"url": profile.broker_url, "username": profile.username}
    if password_file is not None:
        broker["password_file"] = str(password_file)
    if profile.ca_file is not None:
        broker["ca_file"] = str(profile.ca_file)
    data = {
        "operator": {
            "id": profile.operator,
            "key": str(profile.key_file),
            "hub_key": str(profile.hub_key_file),
        },
        "broker": broker,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data), encoding="utf-8")


async def call(profile: OperatorProfile, op: str, args: Mapping[str, Any] | None = None) -> Any:
    """One request on a fresh connection (for CLI commands)."""
    client = OperatorClient(profile)
    async with client.connected():
        return await client.request(op, args)
