"""The test twin of ``hub_env`` with physical ranges and level/switch cross-checks.

The tank is 5 m high (``static.height_m``) and has a high-level switch that trips at
4.5 m; the level may read 0 .. 5 m ± 0.05 m, and the two readings must agree with a
0.1 m band around the trip point. Implausible readings are investigated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from support.hub_env import HubFiles, write_hub_config

LEVEL_SPEC = "max_rate = 1.0\n"
"""A line of the level attribute in ``HUB_TOML``: the physical keys go after it."""

PHYSICAL = """physical_min = 0
physical_max = "static.height_m"
physical_margin = 0.05

[types.tank.attributes.high_level]
description = "level switch, on above 4.5 m"
"""

CHECKS = """
[[reconciliation.rules]]
drift = "semantic.implausible"
strategy = "investigate"

[[plausibility]]
id = "level-vs-switch"
description = "a level above 4.6 m has the high-level switch on"
when = "tank-1.level > 4.6"
require = "tank-1.high_level == true"

[[plausibility]]
id = "switch-vs-level"
when = "tank-1.high_level == true"
require = "tank-1.level > 4.4"
"""


def write_plausible_config(directory: Path, **kw: Any) -> HubFiles:
    """``write_hub_config`` plus physical ranges, a switch and two cross-checks."""
    files = write_hub_config(directory, extra=CHECKS, **kw)
    text = files.config.read_text()
    assert LEVEL_SPEC in text
    assert "static = { area_m2 = 1.0 }" in text
    text = text.replace(LEVEL_SPEC, LEVEL_SPEC + PHYSICAL, 1).replace(
        "static = { area_m2 = 1.0 }", "static = { area_m2 = 1.0, height_m = 5.0 }", 1
    )
    files.config.write_text(text)
    return files
