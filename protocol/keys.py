"""Ed25519 key pairs, key files, key ids and the receiver's key registry.

Key files are PEM: PKCS#8 for private keys (``NAME.key``, mode 0600) and
SubjectPublicKeyInfo for public keys (``NAME.pub``). A key id is the first 16 hex
digits of the SHA-256 of the raw 32-byte public key, so anyone holding the public
file can compute it and compare it with ``fieldtwin keys show``.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fieldtwin.protocol.errors import BadSignature, InsecureKeyFile, KeyFileError, UnknownKey

KEY_ID_HEX_DIGITS = 16


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """Fingerprint of a public key: 16 lowercase hex digits of SHA-256(raw key)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_HEX_DIGITS]


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A verifying key with its fingerprint, as held in a registry."""

    key: Ed25519PublicKey
    key_id: str

    @classmethod
    def from_key(cls, key: Ed25519PublicKey) -> PublicKey:
        return cls(key=key, key_id=key_id_of(key))

    @classmethod
    def from_raw(cls, raw: bytes) -> PublicKey:
        if len(raw) != 32:
            raise KeyFileError(f"a raw Ed25519 public key is 32 bytes, got {len(raw)}")
        return cls.from_key(Ed25519PublicKey.from_public_bytes(raw))

    def raw(self) -> bytes:
        return self.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def pem(self) -> bytes:
        return self.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def verify(self, signature: bytes, data: bytes) -> None:
        try:
            self.key.verify(signature, data)
        except InvalidSignature:
            raise BadSignature(f"signature does not verify with key {self.key_id}") from None


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A signing key; ``public`` is what peers put in their registry."""

    private: Ed25519PrivateKey
    public: PublicKey

    @classmethod
    def generate(cls) -> KeyPair:
        return cls.from_private(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> KeyPair:
        """Deterministic key from 32 seed bytes (test vectors, never production)."""
        if len(seed) != 32:
            raise KeyFileError(f"an Ed25519 seed is 32 bytes, got {len(seed)}")
        return cls.from_private(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def from_private(cls, private: Ed25519PrivateKey) -> KeyPair:
        return cls(private=private, public=PublicKey.from_key(private.public_key()))

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)

    def private_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def write_key_pair(directory: Path, name: str) -> tuple[Path, Path, KeyPair]:
    """Create ``DIR/NAME.key`` (0600) and ``DIR/NAME.pub``; never overwrite either."""
    if not name or "/" in name or name.startswith("."):
        raise KeyFileError(f"key name {name!r} must be a plain file name such as 'gw-01'")
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / f"{name}.key"
    pub_path = directory / f"{name}.pub"
    for path in (key_path, pub_path):
        if path.exists():
            raise KeyFileError(f"{path} already exists; refusing to overwrite a key")
    pair = KeyPair.generate()
    _write_exclusive(key_path, pair.private_pem(), 0o600)
    try:
        _write_exclusive(pub_path, pair.public.pem(), 0o644)
    except BaseException:
        key_path.unlink(missing_ok=True)
        raise
    return key_path, pub_path, pair


def _write_exclusive(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL closes the race with a concurrent writer; the mode is set at creation,
    # so the private key is never briefly world-readable.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(path, mode)  # umask may have narrowed the mode given to open()


def load_private_key(path: Path | str) -> KeyPair:
    """Load a signing key, refusing a file that group or others could read."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyFileError(
            f"private key file {path} does not exist; create one with "
            f"'fieldtwin keys new NAME --dir {path.parent}'"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read private key file {path}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InsecureKeyFile(
            f"private key file {path} has mode {stat.S_IMODE(info.st_mode):04o} and is "
            f"readable by group or others; run 'chmod 600 {path}'"
        )
    data = _read(path, "private key")
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(private).__name__}, not an Ed25519 key")
    return KeyPair.from_private(private)


def load_public_key(path: Path | str) -> PublicKey:
    """Load a verifying key from a ``.pub`` file (or derive it from a ``.key`` file)."""
    path = Path(path)
    data = _read(path, "public key")
    if b"PRIVATE KEY" in data:
        return load_private_key(path).public
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(public, Ed25519PublicKey):
        raise KeyFileError(f"{path} holds a {type(public).__name__}, not an Ed25519 key")
    return PublicKey.from_key(public)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{what} file {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} file {path}: {exc.strerror}") from None


@dataclass(slots=True)
class KeyRegistry:
    """Which keys may sign for which sender.

    A sender may hold several keys at once (rotation); a key id is bound to one
    sender, so a gateway cannot sign frames in another gateway's name.
    """

    _keys: dict[str, dict[str, PublicKey]] = field(default_factory=dict)

    @classmethod
    def of(cls, entries: Mapping[str, PublicKey | Iterable[PublicKey]]) -> KeyRegistry:
        registry = cls()
        for sender, keys in entries.items():
            for key in [keys] if isinstance(keys, PublicKey) else keys:
                registry.add(sender, key)
        return registry

    def add(self, sender: str, key: PublicKey) -> None:
        self._keys.setdefault(sender, {})[key.key_id] = key

    def remove(self, sender: str, key_id: str | None = None) -> None:
        if key_id is None:
            self._keys.pop(sender, None)
        else:
            self._keys.get(sender, {}).pop(key_id, None)

    def lookup(self, sender: str, key_id: str) -> PublicKey:
        keys = self._keys.get(sender)
        if keys is None:
            raise UnknownKey(f"sender {sender!r} is not registered")
        key = keys.get(key_id)
        if key is None:
            raise UnknownKey(f"key {key_id} is not registered for sender {sender!r}")
        return key

    def senders(self) -> list[str]:
        return sorted(self._keys)

    def __contains__(self, sender: object) -> bool:
        return sender in self._keys
