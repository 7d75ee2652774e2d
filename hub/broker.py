"""``fieldtwin broker config``: the site's Mosquitto files, generated from the hub's registry.

A site never writes its broker config by hand: the users are exactly ``hub``, every
gateway and every operator of the hub config (``-c hub.toml``), and each gets explicit
ACL lines (docs/broker.md has the table):

* a gateway writes only ``ft/v1/{gw}/up/#`` and reads ``ft/v1/{gw}/down/#`` and
  ``ft/v1/hub/state``;
* an operator writes only ``ft/v1/op/{id}/req`` and reads ``ft/v1/op/{id}/resp``,
  ``ft/v1/hub/view/#`` and ``ft/v1/hub/state``;
* the hub reads ``ft/v1/+/up/#`` and ``ft/v1/op/+/req``, writes ``ft/v1/+/down/#`` and
  ``ft/v1/op/+/resp``, and reads and writes ``ft/v1/hub/#``;
* a load generator (``--loadgen-user NAME``, benchmarks only, never on a site) writes
  every ``ft/v1/+/up/#`` and reads every ``ft/v1/+/down/#`` and ``ft/v1/hub/state``, so
  a few connections can play a thousand gateways (``fieldtwin sim gateways``). The hub
  still verifies each frame's per-gateway signature, but the broker no longer keeps one
  gateway from writing another's topics for that user.

``use_username_as_clientid`` ties every connection's client id to its username, so one
user's credentials can never take over (knock off) another client's session, and
``max_packet_size`` refuses anything larger than the largest legal frame plus MQTT
overhead before the hub reads it. Passwords are random (32 bytes, URL-safe base64),
one file per user (mode 0600) for the component that logs in, and the broker's
password file holds their PBKDF2-SHA512 hashes in Mosquitto's ``$7$`` format (the
tests check it against a real Mosquitto). ``--tls`` adds a CA, a server certificate
and one client certificate per user (``cryptography``), and a TLS listener that
requires a client certificate signed by that CA.

Re-running is how a site adds a gateway or an operator: existing secrets (passwords,
CA and keys) are kept and only missing ones are created; ``--force`` replaces them
all. The config and ACL are always rewritten (they hold no secret). Files the broker
reads are group ``mosquitto`` and mode 0640 when this runs as root, because Mosquitto
started as root drops to its own user before it reads them.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import grp
import hashlib
import ipaddress
import os
import secrets
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fieldtwin.hub.errors import HubError
from fieldtwin.protocol.messages import ID_PATTERN
from fieldtwin.protocol.topics import RESERVED_IDS

HUB_USER = "hub"
ROLES = ("hub", "gateway", "operator", "loadgen")
PBKDF2_ITERATIONS = 101
"""Mosquitto's own default for ``$7$`` hashes; the passwords are 256-bit random, so the
iteration count does not protect them, and a low count keeps each login cheap."""
MQTT_OVERHEAD_BYTES = 64 * 1024
"""Allowance over the largest legal frame: fixed header, topic, packet id, properties."""
DEFAULT_MAX_FRAME_BYTES = 1 << 20
CERT_DAYS = 3650
SERVER_CERT_DAYS = 825


class BrokerConfigError(HubError):
    """The broker files cannot be generated (bad registry, a secret in the way)."""


@dataclass(frozen=True, slots=True)
class BrokerUser:
    name: str
    role: str  # "hub", "gateway", "operator" or "loadgen"

    def acl_lines(self) -> list[str]:
        if self.role == "hub":
            return [
                "topic read ft/v1/+/up/#",
                "topic write ft/v1/+/down/#",
                "topic read ft/v1/op/+/req",
                "topic write ft/v1/op/+/resp",
                "topic readwrite ft/v1/hub/#",
            ]
        if self.role == "loadgen":
            # benchmark-only: many simulated gateways over a few connections
            return [
                "topic write ft/v1/+/up/#",
                "topic read ft/v1/+/down/#",
                "topic read ft/v1/hub/state",
            ]
        if self.role == "gateway":
            return [
                f"topic write ft/v1/{self.name}/up/#",
                f"topic read ft/v1/{self.name}/down/#",
                "topic read ft/v1/hub/state",
            ]
        return [
            f"topic write ft/v1/op/{self.name}/req",
            f"topic read ft/v1/op/{self.name}/resp",
            "topic read ft/v1/hub/view/#",
            "topic read ft/v1/hub/state",
        ]


@dataclass(slots=True)
class BrokerOptions:
    """Where the broker listens and how it runs; the defaults are a site's."""

    port: int = 1883
    bind: str = "127.0.0.1"
    tls: bool = False
    tls_port: int = 8883
    tls_bind: str = ""
    hostnames: Sequence[str] = ()
    require_client_certs: bool = True
    """With ``tls``: the TLS listener also requires a client certificate from the CA."""
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    persistence_dir: Path | None = Path("/var/lib/mosquitto")
    log_file: Path | None = None
    run_as: str | None = None
    bind_client_ids: bool = True
    """``use_username_as_clientid``. Off only for the shared test broker, where several
    hub stand-ins with their own client ids and sessions share one broker."""
    max_queued_messages: int = 100_000
    force: bool = False


@dataclass(slots=True)
class BrokerFiles:
    """What ``generate`` wrote (paths) and the users' plaintext passwords."""

    root: Path
    conf: Path
    acl: Path
    passwd: Path
    users: list[BrokerUser]
    passwords: dict[str, str] = field(default_factory=dict)
    password_files: dict[str, Path] = field(default_factory=dict)
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    ca_cert: Path | None = None
    server_cert: Path | None = None
    server_key: Path | None = None
    client_certs: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def max_packet_size(self) -> int:
        for line in self.conf.read_text().splitlines():
            if line.startswith("max_packet_size "):
                return int(line.split()[1])
        return 0


# -- the registry ---------------------------------------------------------------------------


def check_user(name: str) -> str:
    if ID_PATTERN.fullmatch(name) is None:
        raise BrokerConfigError(
            f"user {name!r} must be 1-64 letters, digits, '_', '.' or '-', starting alphanumeric"
        )
    return name


def registry_users(
    gateways: Iterable[str], operators: Iterable[str], loadgen: Iterable[str] = ()
) -> list[BrokerUser]:
    """``hub``, then every gateway, every operator and every load generator user (ids
    distinct and not reserved)."""
    users = [BrokerUser(HUB_USER, "hub")]
    seen = {HUB_USER}
    roles = (("gateway", gateways), ("operator", operators), ("loadgen", loadgen))
    for role, names in roles:
        for name in sorted(names):
            check_user(name)
            if name in seen or name in RESERVED_IDS:
                raise BrokerConfigError(
                    f"{role} id {name!r} is reserved or used twice; every broker user needs "
                    "its own name"
                )
            seen.add(name)
            users.append(BrokerUser(name, role))
    return users


def users_from_hub_config(path: Path, loadgen: Iterable[str] = ()) -> tuple[list[BrokerUser], int]:
    """The broker users and the largest legal frame of a hub config file (plus the
    benchmark-only load generator users ``loadgen``)."""
    from fieldtwin.hub.config import load_hub_config

    config = load_hub_config(path)
    if config.broker.username != HUB_USER:
        raise BrokerConfigError(
            f"{path}: [broker] username is {config.broker.username!r}; the generated ACL "
            f"gives the hub's rights to user {HUB_USER!r}, so leave the key out"
        )
    users = registry_users(config.gateways, config.operators, loadgen)
    return users, config.ingest.max_frame_bytes


# -- file contents ---------------------------------------------------------------------------


def acl_text(users: Sequence[BrokerUser]) -> str:
    lines = [
        "# fieldtwin broker ACL, generated by `fieldtwin broker config` from the hub's registry.",
        "# Do not edit: register gateways and operators in hub.toml and run the command again.",
        "# Explicit lines per user; no pattern lines (a user not listed here may do nothing).",
    ]
    for user in users:
        lines += ["", f"# {user.role}", f"user {user.name}", *user.acl_lines()]
    return "\n".join(lines) + "\n"


def max_packet_size(max_frame_bytes: int) -> int:
    return max_frame_bytes + MQTT_OVERHEAD_BYTES


def conf_text(root: Path, options: BrokerOptions, tls_files: dict[str, Path] | None) -> str:
    lines = [
        "# fieldtwin broker configuration (Mosquitto 2.x), generated by `fieldtwin broker config`.",
        "# Do not edit: change hub.toml or the command's options and run it again.",
    ]
    if options.run_as:
        lines.append(f"user {options.run_as}")
    lines += [
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {root / 'fieldtwin.passwd'}",
        f"acl_file {root / 'fieldtwin.acl'}",
    ]
    lines += [
        f"# The largest legal frame ({options.max_frame_bytes} bytes) plus MQTT overhead;",
        "# a larger packet disconnects its sender before anyone reads it.",
        f"max_packet_size {max_packet_size(options.max_frame_bytes)}",
        "max_inflight_messages 100",
        f"max_queued_messages {options.max_queued_messages}",
    ]
    if options.persistence_dir is not None:
        lines += ["persistence true", f"persistence_location {options.persistence_dir}/"]
    else:
        lines.append("persistence false")
    if options.log_file is not None:
        lines += [
            "log_type error",
            "log_type warning",
            "log_type notice",
            f"log_dest file {options.log_file}",
        ]
    # use_username_as_clientid is a listener option: a client's id is its username, so
    # one user's credentials cannot take over the session of the hub or another gateway.
    bind_ids = ["use_username_as_clientid true"] if options.bind_client_ids else []
    lines += [
        "",
        "# Plain MQTT on the hub's host only.",
        f"listener {options.port} {options.bind}",
        *bind_ids,
    ]
    if tls_files is not None:
        listener = f"listener {options.tls_port}" + (
            f" {options.tls_bind}" if options.tls_bind else ""
        )
        lines += [
            "",
            "# TLS for remote gateways and consoles: "
            + (
                "a client certificate from this CA is required,"
                if options.require_client_certs
                else "password only, no client certificate asked for"
            ),
            "# and a password, as on the plain listener.",
            listener,
            *bind_ids,
            f"cafile {tls_files['ca']}",
            f"certfile {tls_files['cert']}",
            f"keyfile {tls_files['key']}",
            f"require_certificate {'true' if options.require_client_certs else 'false'}",
            "tls_version tlsv1.2",
        ]
    return "\n".join(lines) + "\n"


def password_hash(password: str, salt: bytes | None = None) -> str:
    """Mosquitto's ``$7$`` format: PBKDF2-HMAC-SHA512, base64 salt and digest."""
    salt = salt if salt is not None else os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return (
        f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}$"
        f"{base64.b64encode(digest).decode()}"
    )


def new_password() -> str:
    return secrets.token_urlsafe(32)


# -- writing ------------------------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write through a temporary file and rename, created with ``mode`` from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.chmod(temporary, mode)
    os.replace(temporary, path)


def _broker_group(options: BrokerOptions) -> int | None:
    """The group the broker's files belong to when Mosquitto drops to its own user."""
    if os.geteuid() != 0 or options.run_as == "root":
        return None
    try:
        return grp.getgrnam(options.run_as or "mosquitto").gr_gid
    except KeyError:
        return None


def _broker_readable(path: Path, group: int | None) -> None:
    if group is None:
        return
    os.chown(path, 0, group)
    os.chmod(path, 0o640)


def generate(
    root: Path, users: Sequence[BrokerUser], options: BrokerOptions | None = None
) -> BrokerFiles:
    """Write mosquitto.conf, fieldtwin.acl, fieldtwin.passwd, passwords/ (and tls/)."""
    options = options or BrokerOptions()
    if not users or users[0].name != HUB_USER:
        raise BrokerConfigError("the first broker user must be the hub")
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    files = BrokerFiles(
        root=root,
        conf=root / "mosquitto.conf",
        acl=root / "fieldtwin.acl",
        passwd=root / "fieldtwin.passwd",
        users=list(users),
    )
    group = _broker_group(options)
    if os.geteuid() == 0 and group is None and options.run_as != "root":
        files.warnings.append(
            "no 'mosquitto' group: make fieldtwin.passwd, fieldtwin.acl and the TLS files "
            "readable by the user Mosquitto runs as (it drops root before reading them)"
        )
    secrets_dir = root / "passwords"
    secrets_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(secrets_dir, 0o700)
    hashed: list[str] = []
    for user in users:
        path = secrets_dir / f"{user.name}.password"
        files.password_files[user.name] = path
        if path.exists() and not options.force:
            password = path.read_text(encoding="utf-8").strip()
            if not password:
                raise BrokerConfigError(f"{path} is empty; delete it or run with --force")
            files.kept.append(path)
        else:
            password = new_password()
            _write(path, (password + "\n").encode(), 0o600)
            files.created.append(path)
        files.passwords[user.name] = password
        hashed.append(f"{user.name}:{password_hash(password)}")
    _write(files.passwd, ("\n".join(hashed) + "\n").encode(), 0o600)
    _broker_readable(files.passwd, group)
    tls_files: dict[str, Path] | None = None
    if options.tls:
        tls_files = _tls(root / "tls", users, options, files, group)
    _write(files.acl, acl_text(users).encode(), 0o644)
    _write(files.conf, conf_text(root, options, tls_files).encode(), 0o644)
    return files


# -- TLS ------------------------------------------------------------------------------------


def _name(common_name: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fieldtwin"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    data: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return data


def _pem_cert(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    data: bytes = cert.public_bytes(serialization.Encoding.PEM)
    return data


def _load_ca(cert_path: Path, key_path: Path) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise BrokerConfigError(
            f"cannot read the CA in {cert_path.parent}: {exc}; restore it or run with --force "
            "(every certificate is then issued anew)"
        ) from None
    return cert, key


def _issue(
    ca_cert: Any, ca_key: Any, common_name: str, *, server: bool, sans: Sequence[str] = ()
) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_CERT_DAYS if server else CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        names: list[x509.GeneralName] = []
        for name in sans:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                names.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _new_ca() -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("fieldtwin broker CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _tls(
    folder: Path,
    users: Sequence[BrokerUser],
    options: BrokerOptions,
    files: BrokerFiles,
    group: int | None,
) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)
    ca_cert_path, ca_key_path = folder / "ca.crt", folder / "ca.key"
    fresh_ca = options.force or not ca_key_path.exists()
    if fresh_ca:
        ca_cert, ca_key = _new_ca()
        _write(ca_key_path, _pem_key(ca_key), 0o600)
        _write(ca_cert_path, _pem_cert(ca_cert), 0o644)
        files.created += [ca_key_path, ca_cert_path]
    else:
        ca_cert, ca_key = _load_ca(ca_cert_path, ca_key_path)
        files.kept.append(ca_key_path)

    def pair(cert_path: Path, key_path: Path, common_name: str, server: bool) -> None:
        if not fresh_ca and cert_path.exists() and key_path.exists():
            files.kept.append(key_path)
            return
        sans = list(dict.fromkeys([*options.hostnames, "localhost", "127.0.0.1"]))
        cert, key = _issue(ca_cert, ca_key, common_name, server=server, sans=sans)
        _write(key_path, _pem_key(key), 0o600)
        _write(cert_path, _pem_cert(cert), 0o644)
        files.created += [key_path, cert_path]

    server_cert, server_key = folder / "server.crt", folder / "server.key"
    pair(server_cert, server_key, (list(options.hostnames) or ["localhost"])[0], True)
    _broker_readable(server_key, group)
    for user in users:
        cert_path = folder / "clients" / f"{user.name}.crt"
        key_path = folder / "clients" / f"{user.name}.key"
        pair(cert_path, key_path, user.name, False)
        files.client_certs[user.name] = (cert_path, key_path)
    files.ca_cert, files.server_cert, files.server_key = ca_cert_path, server_cert, server_key
    return {"ca": ca_cert_path, "cert": server_cert, "key": server_key}


# -- the command ----------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    broker = subparsers.add_parser(
        "broker",
        help="generate the site's Mosquitto config, ACL, passwords and certificates",
        description=(
            "Generate the broker's files from the hub's registry of gateways and operators, "
            "so nobody writes them by hand. See docs/broker.md."
        ),
    )
    actions = broker.add_subparsers(dest="broker_command", metavar="ACTION", required=True)
    config = actions.add_parser(
        "config",
        help="write mosquitto.conf, the ACL, password files (and, with --tls, certificates)",
        description=(
            "Write OUT/mosquitto.conf, OUT/fieldtwin.acl, OUT/fieldtwin.passwd (hashes) and "
            "OUT/passwords/USER.password (mode 0600) for users hub, every gateway and every "
            "operator of the hub config; with --tls also OUT/tls/ (CA, server and one client "
            "certificate per user). Existing passwords, keys and the CA are kept unless "
            "--force; run it again after registering a gateway or an operator."
        ),
    )
    config.add_argument("-c", "--config", type=Path, required=True, help="hub config (TOML)")
    config.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: 'broker' next to the hub config)",
    )
    config.add_argument("--port", type=int, default=1883, help="plain MQTT port (default 1883)")
    config.add_argument(
        "--bind", default="127.0.0.1", help="plain listener address (default 127.0.0.1)"
    )
    config.add_argument("--tls", action="store_true", help="add a TLS listener and certificates")
    config.add_argument("--tls-port", type=int, default=8883, help="TLS port (default 8883)")
    config.add_argument(
        "--tls-bind", default="", help="TLS listener address (default: every interface)"
    )
    config.add_argument(
        "--no-client-certs",
        action="store_true",
        help="with --tls: accept clients without a certificate (password only)",
    )
    config.add_argument(
        "--hostname",
        action="append",
        default=[],
        help="name or address gateways use to reach the broker (repeat; for the certificate)",
    )
    config.add_argument(
        "--persistence-dir",
        type=Path,
        default=Path("/var/lib/mosquitto"),
        help="where Mosquitto saves queued messages (default /var/lib/mosquitto)",
    )
    config.add_argument(
        "--no-persistence", action="store_true", help="do not persist queued messages"
    )
    config.add_argument("--log-file", type=Path, default=None, help="Mosquitto log file")
    config.add_argument(
        "--run-as",
        default=None,
        help="user Mosquitto runs as (its 'user' option; default: Mosquitto's own)",
    )
    config.add_argument(
        "--loadgen-user",
        action="append",
        default=[],
        metavar="NAME",
        help=(
            "BENCHMARKS ONLY: a user that may write every gateway's uplink and read every "
            "downlink, for 'fieldtwin sim gateways run --username NAME' (repeat)"
        ),
    )
    config.add_argument(
        "--force", action="store_true", help="replace existing passwords, keys and the CA"
    )
    config.set_defaults(func=_config_command)


def _config_command(args: argparse.Namespace) -> int:
    try:
        users, max_frame = users_from_hub_config(args.config, args.loadgen_user)
        out = args.out if args.out is not None else args.config.parent / "broker"
        options = BrokerOptions(
            port=args.port,
            bind=args.bind,
            tls=args.tls,
            tls_port=args.tls_port,
            tls_bind=args.tls_bind,
            hostnames=args.hostname,
            require_client_certs=not args.no_client_certs,
            max_frame_bytes=max_frame,
            persistence_dir=None if args.no_persistence else args.persistence_dir,
            log_file=args.log_file,
            run_as=args.run_as,
            force=args.force,
        )
        files = generate(out, users, options)
    except (BrokerConfigError, OSError) as exc:
        print(f"fieldtwin: error: {exc}", file=sys.stderr)
        return 1
    print(f"broker files in {files.root}:")
    print(f"  {files.conf.name:<18} run: mosquitto -c {files.conf}")
    print(f"  {files.acl.name:<18} explicit topic rights of {len(files.users)} users")
    print(f"  {files.passwd.name:<18} password hashes (PBKDF2-SHA512)")
    print(f"  max_packet_size    {files.max_packet_size} bytes")
    for user in files.users:
        state = "kept" if files.password_files[user.name] in files.kept else "new"
        print(f"  {user.role:<9} {user.name:<24} {files.password_files[user.name]} ({state})")
    if files.ca_cert is not None:
        print(f"  tls: CA {files.ca_cert}, server {files.server_cert}, clients in tls/clients/")
    for warning in files.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0
