"""The ``kvstore`` command.

Each subcommand lives in its own module, imported only when it runs, so
``kvstore --help`` stays fast and needs nothing optional::

    kvstore demo              the reference decoder over the embedded cache (decoder.demo)
    kvstore bench hitrate     trace replay through the real index and policies (kvstore.replay.cli)
    kvstore serve             the daemon: shared host pool + L3 for every engine on the node (controller.serve_cli)
    kvstore status            a running daemon's summary (controller.status_cli)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Sequence

# command path -> (module, one-line help). Each module provides
# add_arguments(parser) and run(args) -> int.
_COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("demo",): ("decoder.demo", "multi-turn agent conversation on the reference decoder, cache on vs off"),
    ("serve",): ("controller.serve_cli", "run the cache daemon: shared host pool and L3 for this node"),
    ("status",): ("controller.status_cli", "print a running daemon's summary"),
    ("bench", "hitrate"): ("kvstore.replay.cli", "replay a request trace: hit rates per policy and capacity"),
}


def _named_command(argv: Sequence[str]) -> tuple[str, ...] | None:
    """The command path that argv names, from its leading words (options skipped)."""
    words = [w for w in argv if not w.startswith("-")]
    for path in _COMMANDS:
        if tuple(words[: len(path)]) == path:
            return path
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The full parser; only the command named in ``argv`` gets its module imported."""
    parser = argparse.ArgumentParser(prog="kvstore", description="Tiered KV-cache service for LLM inference.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    named = _named_command(argv)
    for path, (module, help_text) in _COMMANDS.items():
        subparsers = top
        if len(path) == 2:
            if path[0] not in groups:
                group = top.add_parser(path[0], help=f"{path[0]} commands")
                groups[path[0]] = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            subparsers = groups[path[0]]
        sub = subparsers.add_parser(path[-1], help=help_text, description=help_text)
        sub.set_defaults(_module=module)
        if path == named:
            importlib.import_module(module).add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`kvstore status | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
