"""The ``selftune`` command line.

``dispatch`` builds the parser and runs a command; ``common`` holds what every subcommand
shares; each other module registers its subcommands (options generated from their dataclasses)
and runs them. Building the parser imports no torch/transformers/datasets/accelerate: they are
imported when a command runs.
"""

from selftune.cli.dispatch import build_parser, entry, main

__all__ = ["build_parser", "entry", "main"]
