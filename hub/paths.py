"""Where the demo keeps its state when no ``--state-dir`` is given."""

from __future__ import annotations

import os
from pathlib import Path


def default_state_dir() -> Path:
    """``$XDG_DATA_HOME/fieldtwin`` (``~/.local/share/fieldtwin`` when unset)."""
    base = os.environ.get("XDG_DATA_HOME")
    root = Path(base).expanduser() if base else Path.home() / ".local" / "share"
    return root / "fieldtwin"
