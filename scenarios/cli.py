"""The installed ``crashlab`` command: the product's commands and the scenario layer's.

The product's commands (app/cli.py) are parsed by app/cli.py alone, so
``crashlab serve`` imports nothing of the emulators or the scenarios; the
others (scenarios/commands.py, scenarios/bench.py) are imported only to run one
of them or to print the whole help.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from app import cli as product_cli


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if product_cli.is_product_command(args):
        return product_cli.main(args)
    return product_cli.run(build_parser(), args)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``crashlab`` parser: the product's commands, then this layer's."""
    from scenarios.bench import add_bench_parser
    from scenarios.commands import add_host_commands, add_scenario_parser

    return product_cli.build_parser(add_host_commands, add_scenario_parser, add_bench_parser)


if __name__ == "__main__":
    sys.exit(main())
