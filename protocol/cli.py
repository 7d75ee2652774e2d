"""The ``fieldtwin`` command.

Subcommands come from the ``fieldtwin.commands`` entry-point group: each package
registers its own (``keys`` here, ``agent`` in the agent package, and so on), so this
module never imports agent, hub or simulator code and ``--help`` lists exactly the
subcommands that are installed. A ``register(subparsers)`` function adds one
subcommand whose handlers set ``func`` to a callable taking the parsed arguments and
returning an exit status. Handlers import heavy libraries lazily, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from fieldtwin.protocol import logfmt
from fieldtwin.protocol.errors import ProtocolError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


def _version() -> str:
    try:
        return metadata.version("fieldtwin")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command tree, or with ``only`` just that subcommand's branch (when one
    of that name is installed): a long-running ``fieldtwin agent run`` then never
    imports the hub's or simulator's CLI modules (about 2 MB of a gateway's memory)."""
    parser = argparse.ArgumentParser(
        prog="fieldtwin",
        description=(
            "fieldtwin keeps a live digital twin of physical plant: edge agents read devices "
            "and stream signed deltas over MQTT to a hub that holds the twin, detects drift "
            "and sends operator-approved commands."
        ),
        epilog="Run 'fieldtwin COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"fieldtwin {_version()}")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (logs go to stdout as logfmt lines; default: info)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    entries = sorted(metadata.entry_points(group="fieldtwin.commands"), key=lambda e: e.name)
    if only is not None and any(entry.name == only for entry in entries):
        entries = [entry for entry in entries if entry.name == only]
    for entry in entries:
        register: Callable[[Any], None] = entry.load()
        register(subparsers)
    return parser


def _command_name(argv: Sequence[str] | None) -> str | None:
    """The subcommand named on the command line, if any (skipping global options)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--log-level")
    _, rest = pre.parse_known_args(argv)
    return rest[0] if rest and not rest[0].startswith("-") else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(_command_name(argv))
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "func", None)
    if handler is None:
        parser.print_help()
        return EXIT_USAGE
    logfmt.configure(args.log_level)
    try:
        return handler(args)
    except ProtocolError as exc:
        # Expected, user-facing failures (bad config, bad key file): one clear line.
        print(f"fieldtwin: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


# -- keys ---------------------------------------------------------------------------------


def register_keys(subparsers: Any) -> None:
    keys = subparsers.add_parser(
        "keys",
        help="create and inspect Ed25519 key pairs",
        description=(
            "Every gateway, the hub and every operator has an Ed25519 key pair. The private "
            "key (NAME.key, mode 0600) never leaves its machine; the public key (NAME.pub) "
            "goes into the peer's registry. A key id is the first 16 hex digits of the "
            "SHA-256 of the public key."
        ),
    )
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    new = actions.add_parser(
        "new",
        help="write DIR/NAME.key (0600) and DIR/NAME.pub",
        description="Generate a key pair. Existing files are never overwritten.",
    )
    new.add_argument("name", help="key name, e.g. the gateway id 'gw-01'")
    new.add_argument("--dir", type=Path, default=Path("."), help="output folder (default: .)")
    new.set_defaults(func=_keys_new)

    show = actions.add_parser(
        "show",
        help="print the key id of a .key or .pub file",
        description="Print the key id (and, with --pem, the public key) of a key file.",
    )
    show.add_argument("file", type=Path, help="a NAME.key or NAME.pub file")
    show.add_argument("--pem", action="store_true", help="also print the public key as PEM")
    show.set_defaults(func=_keys_show)


def _keys_new(args: argparse.Namespace) -> int:
    from fieldtwin.protocol.keys import write_key_pair

    key_path, pub_path, pair = write_key_pair(args.dir, args.name)
    print(f"key id   {pair.key_id}")
    print(f"private  {key_path}  (mode 0600; keep it on this machine)")
    print(f"public   {pub_path}  (give this to the peer that verifies)")
    return EXIT_OK


def _keys_show(args: argparse.Namespace) -> int:
    from fieldtwin.protocol.keys import load_public_key

    public = load_public_key(args.file)
    print(public.key_id)
    if args.pem:
        print(public.pem().decode().rstrip())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
