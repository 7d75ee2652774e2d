"""The demo's embedded MQTT broker: amqtt on a loopback port, in its own process.

``python -m fieldtwin.hub.embedded_broker --port N`` serves MQTT 3.1.1 on 127.0.0.1:N
and prints one JSON line ``{"url": "mqtt://127.0.0.1:N"}`` on stdout once it listens;
SIGINT/SIGTERM shut it down. It exists so ``fieldtwin demo`` needs nothing installed
besides the Python package. It listens on loopback only and accepts any client (no
passwords, no ACLs); every frame is still signed and verified end to end, so a forged
frame is refused by the hub as it would be on a site broker. Sites run Mosquitto with
the project's ACL (examples/mosquitto/).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys

from fieldtwin.protocol import logfmt
from fieldtwin.protocol.aio import within

log = logging.getLogger("fieldtwin.hub.broker")


def broker_config(port: int) -> dict[str, object]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


async def serve(port: int) -> None:
    from amqtt.broker import Broker

    broker = Broker(broker_config(port))
    await broker.start()
    print(json.dumps({"url": f"mqtt://127.0.0.1:{port}"}), flush=True)
    log.info("embedded broker listening", extra=logfmt.fields(port=port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    with contextlib.suppress(Exception):
        await within(10, broker.shutdown())
    log.info("embedded broker stopped", extra=logfmt.fields(port=port))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logfmt.configure("WARNING", stream=sys.stderr)
    logging.getLogger("fieldtwin").setLevel(logging.INFO)
    try:
        asyncio.run(serve(args.port))
    except OSError as exc:
        print(f"embedded broker: cannot listen on 127.0.0.1:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
