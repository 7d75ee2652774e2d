"""Fixed test keys. Never use these anywhere but tests: the seeds are public."""

from __future__ import annotations

from fieldtwin.protocol.keys import KeyPair, KeyRegistry

GATEWAY_SEED = bytes(range(32))
HUB_SEED = bytes(range(32, 64))
OTHER_SEED = bytes(range(64, 96))
OPERATOR_SEED = bytes(range(96, 128))

gateway_key = KeyPair.from_seed(GATEWAY_SEED)
hub_key = KeyPair.from_seed(HUB_SEED)
other_key = KeyPair.from_seed(OTHER_SEED)
operator_key = KeyPair.from_seed(OPERATOR_SEED)


def key_for(sender: str) -> KeyPair:
    """The test key a sender signs with, matching registry()."""
    return {"hub": hub_key, "alice": operator_key}.get(sender, gateway_key)


def registry() -> KeyRegistry:
    """gw-01 signs with gateway_key, the hub with hub_key, operator alice with operator_key."""
    return KeyRegistry.of(
        {"gw-01": gateway_key.public, "hub": hub_key.public, "alice": operator_key.public}
    )
