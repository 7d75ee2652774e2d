"""Every command's --help renders: argparse formats help strings with %, and a stray
'%' in one (``80/95 % intervals``) crashed ``fieldtwin twin --help`` with a traceback."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from fieldtwin.protocol.cli import build_parser


def _subparsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    found = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found.extend(_subparsers(child, (*path, name)))
    return found


@pytest.mark.parametrize("path", _subparsers(build_parser()), ids=" ".join)
def test_every_help_renders(path: tuple[str, ...]) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as ended:
        build_parser().parse_args([*path, "--help"])
    assert ended.value.code == 0
    assert "usage: fieldtwin" in out.getvalue()
