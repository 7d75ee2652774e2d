"""Fixed test keys. Never use these anywhere but tests: the seeds are public."""

from __future__ import annotations

from fieldtwin.protocol.keys import KeyPair, KeyRegistry

GATEWAY_SEED = bytes(range(32))
HUB_SEED = bytes(range(32, 64))
OTHER_SEED = bytes(range(64, 96))

gateway_key = KeyPair.from_seed(GATEWAY_SEED)
hub_key = KeyPair.from_seed(HUB_SEED)
other_key = KeyPair.from_seed(OTHER_SEED)


def registry() -> KeyRegistry:
    """The hub's view: gw-01 signs with gateway_key, the hub with hub_key."""
    return KeyRegistry.of({"gw-01": gateway_key.public, "hub": hub_key.public})
