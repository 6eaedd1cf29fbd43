"""The ``meshmq`` command line: one entry point, one subcommand per subsystem.

Each subsystem adds its own subcommands through a ``register(subparsers)`` function in a
private ``_cli`` module, so this file stays a dispatcher:

* ``meshmq nodes``      -- discovery (``meshmq.discovery._cli``)
* ``meshmq journal``    -- the journal node and its tools (``meshmq.durability._cli``)
* ``meshmq replay``     -- read back what a journal stored (``meshmq.durability._cli``)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from meshmq import __version__

#: Modules that contribute subcommands, in the order they appear in ``--help``.
SUBCOMMAND_MODULES = ("meshmq.discovery._cli", "meshmq.durability._cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshmq", description="meshmq: brokerless messaging over ZeroMQ with mDNS discovery"
    )
    parser.add_argument("--version", action="version", version=f"meshmq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real import error inside the module: show it
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
