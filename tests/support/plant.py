"""The demo plant's broker logins on the session's test broker, written where the demo
expects them (STATE/keys/USER.password), so a test's Plant uses the project's ACL."""

from __future__ import annotations

from pathlib import Path

from support.broker import MosquittoBroker

GATEWAYS = ("gw-pumps", "gw-field", "gw-boiler")
OPERATORS = ("alice", "bob", "vic")


def plant_logins(broker: MosquittoBroker, state: Path, *, operators: bool = True) -> None:
    """Register the hub, the demo's gateways and (unless told not to) its operators."""
    keys = state / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    (keys / "hub.password").write_text(broker.passwords["hub"])
    for gateway in GATEWAYS:
        (keys / f"{gateway}.password").write_text(broker.add_user(gateway))
    for operator in OPERATORS if operators else ():
        (keys / f"{operator}.password").write_text(broker.add_user(operator, role="operator"))
