"""A strict TOML reader shared by the agent, hub and simulator configs.

Every error names the file, the key (as a dotted path such as ``devices[2].port``)
and what would be valid, and unknown keys are refused with a suggestion, because a
typo in a config on a gateway should fail at start-up, not silently do nothing.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar, overload

from fieldtwin.protocol.errors import ProtocolError

T = TypeVar("T")


class ConfigError(ProtocolError):
    """A configuration file is unreadable or invalid; the message says where and how to fix."""

    reason = "config"

    def __init__(self, file: Path | str, key: str, problem: str) -> None:
        self.file = str(file)
        self.key = key
        self.problem = problem
        where = f"{self.file}: {key}: " if key else f"{self.file}: "
        super().__init__(where + problem)


class _Missing:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Any = _Missing()


def _describe(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


class Section:
    """One TOML table, read key by key; ``finish()`` refuses keys nobody asked for."""

    def __init__(self, data: Mapping[str, Any], file: Path, path: str = "") -> None:
        self.data = data
        self.file = file
        self.prefix = path
        self._seen: set[str] = set()

    # -- plumbing ---------------------------------------------------------------------

    def key_path(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key_path(key) if key else self.prefix, problem)

    def has(self, key: str) -> bool:
        return key in self.data

    def _raw(self, key: str, default: Any) -> Any:
        self._seen.add(key)
        if key in self.data:
            return self.data[key]
        if default is REQUIRED:
            raise self.error(key, "required key is missing" + self._typo_hint(key))
        return default

    def _typo_hint(self, key: str) -> str:
        """Name a key of this table that looks like a misspelling of the missing one,
        so ``adress = 3`` is reported as the typo it is, not only as a missing key."""
        import difflib  # only on the error path: not on every gateway's heap

        candidates = [k for k in self.data if k not in self._seen and isinstance(k, str)]
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
        if not close:
            return ""
        return f"; this table has an unknown key '{close[0]}': a typo of '{key}'?"

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            key = unknown[0]
            import difflib

            close = difflib.get_close_matches(key, sorted(self._seen), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            known = ", ".join(sorted(self._seen)) or "(none)"
            raise self.error(key, f"unknown key{hint} (valid keys here: {known})")

    # -- typed readers ----------------------------------------------------------------
    # Each reader has two overloads: without a default the key is required and the
    # result has the exact type; with one, the default's type joins the result.

    @overload
    def text(
        self, key: str, *, choices: Iterable[str] | None = ..., allow_empty: bool = ...
    ) -> str: ...
    @overload
    def text(
        self, key: str, default: T, *, choices: Iterable[str] | None = ..., allow_empty: bool = ...
    ) -> str | T: ...
    def text(
        self,
        key: str,
        default: Any = REQUIRED,
        *,
        choices: Iterable[str] | None = None,
        allow_empty: bool = False,
    ) -> Any:
        value = self._raw(key, default)
        if value is default and default is not REQUIRED:
            return value
        if not isinstance(value, str) or (not allow_empty and not value):
            raise self.error(key, f"expected a non-empty string, got {_describe(value)}")
        if choices is not None:
            options = sorted(choices)
            if value not in options:
                raise self.error(key, f"{value!r} is not one of: {', '.join(options)}")
        return value

    @overload
    def integer(self, key: str, *, min: int | None = ..., max: int | None = ...) -> int: ...
    @overload
    def integer(
        self, key: str, default: T, *, min: int | None = ..., max: int | None = ...
    ) -> int | T: ...
    def integer(
        self, key: str, default: Any = REQUIRED, *, min: int | None = None, max: int | None = None
    ) -> Any:
        value = self._raw(key, default)
        if value is default and default is not REQUIRED:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {_describe(value)}")
        self._check_range(key, value, min, max)
        return value

    @overload
    def number(self, key: str, *, min: float | None = ..., max: float | None = ...) -> float: ...
    @overload
    def number(
        self, key: str, default: T, *, min: float | None = ..., max: float | None = ...
    ) -> float | T: ...
    def number(
        self,
        key: str,
        default: Any = REQUIRED,
        *,
        min: float | None = None,
        max: float | None = None,
    ) -> Any:
        value = self._raw(key, default)
        if value is default and default is not REQUIRED:
            return value
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise self.error(key, f"expected a number, got {_describe(value)}")
        self._check_range(key, value, min, max)
        return float(value)

    @overload
    def flag(self, key: str) -> bool: ...
    @overload
    def flag(self, key: str, default: T) -> bool | T: ...
    def flag(self, key: str, default: Any = REQUIRED) -> Any:
        value = self._raw(key, default)
        if value is default and default is not REQUIRED:
            return value
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_describe(value)}")
        return value

    @overload
    def path(self, key: str) -> Path: ...
    @overload
    def path(self, key: str, default: T) -> Path | T: ...
    def path(self, key: str, default: Any = REQUIRED) -> Any:
        """A file path. ``$VARS`` are expanded (systemd's ``$CREDENTIALS_DIRECTORY`` and
        ``$STATE_DIRECTORY``); relative paths are relative to the config file's folder."""
        value = self.text(key, default)
        if value is default and default is not REQUIRED:
            return value
        expanded = os.path.expandvars(value)
        if "$" in expanded:
            raise self.error(
                key,
                f"{value!r} uses an environment variable that is not set (expanded: {expanded!r})",
            )
        path = Path(expanded).expanduser()
        return path if path.is_absolute() else (self.file.parent / path)

    def secret_file(self, key: str) -> str | None:
        """The stripped text of the file ``key`` names (a password file), or None
        without the key: secrets stay out of config files that get copied around."""
        path: Path | None = self.path(key, None)
        if path is None:
            return None
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise self.error(key, f"cannot read {path}: {exc.strerror or exc}") from None

    @overload
    def text_list(self, key: str) -> list[str]: ...
    @overload
    def text_list(self, key: str, default: T) -> list[str] | T: ...
    def text_list(self, key: str, default: Any = REQUIRED) -> Any:
        value = self._raw(key, default)
        if value is default and default is not REQUIRED:
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"expected a list of strings, got {_describe(value)}")
        return list(value)

    def raw(self, key: str, default: Any = REQUIRED) -> Any:
        """The value as TOML gave it, for callers that validate it themselves."""
        return self._raw(key, default)

    def section(self, key: str, *, required: bool = False) -> Section:
        value = self._raw(key, REQUIRED if required else {})
        if not isinstance(value, dict):
            raise self.error(
                key, f"expected a table ([{self.key_path(key)}]), got {_describe(value)}"
            )
        return Section(value, self.file, self.key_path(key))

    def sections(self, key: str, *, required: bool = False) -> list[Section]:
        """An array of tables (``[[key]]``)."""
        value = self._raw(key, REQUIRED if required else [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(key, f"expected an array of tables ([[{self.key_path(key)}]])")
        if required and not value:
            raise self.error(key, f"at least one [[{self.key_path(key)}]] table is required")
        return [Section(v, self.file, f"{self.key_path(key)}[{i}]") for i, v in enumerate(value)]

    def table_items(self, key: str) -> list[tuple[str, Section]]:
        """A table of tables keyed by name (``[key.NAME]``)."""
        outer = self.section(key)
        items = []
        for name, value in outer.data.items():
            outer._seen.add(name)
            if not isinstance(value, dict):
                raise outer.error(name, f"expected a table, got {_describe(value)}")
            items.append((name, Section(value, self.file, outer.key_path(name))))
        return items

    def _check_range(self, key: str, value: float, lo: float | None, hi: float | None) -> None:
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = (
                f"between {lo} and {hi}"
                if lo is not None and hi is not None
                else (f"at least {lo}" if lo is not None else f"at most {hi}")
            )
            raise self.error(key, f"{value} is out of range; expected a value {bounds}")


def load_toml(path: Path | str) -> Section:
    """Parse a TOML file into a root ``Section`` or raise a ``ConfigError`` that says where."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(file, "", "file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(file, "", f"cannot read file: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"not valid TOML: {exc}") from None
    return Section(data, file)
