"""Offline subcommands of ``guard`` (certify, attack, tune, ...), one module each.

Each module exposes ``add_parser(commands)`` that registers its argparse
subparser with ``set_defaults(run=...)``. Modules import only argparse at import
time: their heavy dependencies load inside ``run``, so ``guard serve`` stays lean.
"""
