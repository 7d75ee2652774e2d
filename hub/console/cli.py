"""``fieldtwin console``: the operator console, connected to a hub through the broker.

Identity, as for ``fieldtwin cmd``: ``--profile FILE`` (or ``$FIELDTWIN_PROFILE``), else
the hub config (``-c``, or a demo's ``--state-dir``) for the broker and the hub's public
key, with ``--operator NAME`` or ``--key FILE`` for yours. Nothing opens the hub's
database: the console works from any machine that reaches the broker.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    console = subparsers.add_parser(
        "console",
        help="the operator console (Textual): live twin, alarms, approvals, commands, audit",
        description=(
            "A terminal console for control-room operators. It connects to the broker as "
            "you (your key, your broker login, TLS with mqtts://), pins the hub's public "
            "key and shows only what the hub signed. See docs/console.md."
        ),
    )
    group = console.add_mutually_exclusive_group()
    group.add_argument("-c", "--config", type=Path, help="the hub's config file (hub.toml)")
    group.add_argument("--state-dir", type=Path, help="a demo's state folder (uses DIR/hub.toml)")
    identity = console.add_argument_group("operator identity")
    identity.add_argument(
        "--profile", type=Path, help="operator profile (TOML); or $FIELDTWIN_PROFILE"
    )
    identity.add_argument("--key", type=Path, help="your private key; or $FIELDTWIN_OPERATOR_KEY")
    identity.add_argument("--operator", help="your operator id (default: the key file's name)")
    identity.add_argument("--password-file", type=Path, help="your broker password file")
    identity.add_argument("--broker", help="broker URL (default: the profile's or hub config's)")
    console.set_defaults(func=_console)


def _console(args: argparse.Namespace) -> int:
    from fieldtwin.hub.console.app import run_console
    from fieldtwin.hub.errors import HubError
    from fieldtwin.hub.opclient import OperatorClient, OperatorError, profile_from
    from fieldtwin.protocol.errors import ProtocolError

    try:
        hub_config = None
        if args.profile is None and args.config is None and args.state_dir is not None:
            demo_profile = args.state_dir / "operators" / f"{args.operator}.toml"
            if args.operator and args.key is None and demo_profile.exists():
                args.profile = demo_profile
        if args.profile is None:
            from fieldtwin.hub.cli import _config_path

            hub_config = _config_path(args)
            if args.config is None and not hub_config.exists():
                print(
                    f"fieldtwin: error: {hub_config} does not exist; give --profile FILE or "
                    "-c HUB.toml, or run 'fieldtwin demo' first",
                    file=sys.stderr,
                )
                return 1
        profile = profile_from(
            profile=args.profile,
            hub_config=hub_config,
            operator=args.operator,
            key=args.key,
            password_file=args.password_file,
            broker=args.broker,
        )
        OperatorClient(profile)  # the key and the hub's key load now, or fail clearly
    except (OperatorError, HubError, ProtocolError, OSError) as exc:
        code = getattr(exc, "code", "")
        print(f"fieldtwin: error{f' ({code})' if code else ''}: {exc}", file=sys.stderr)
        return 1
    run_console(lambda: OperatorClient(profile))
    return 0
