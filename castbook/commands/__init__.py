"""One module per `castbook` subcommand, discovered by castbook.cli.

Each module defines `register(subparsers)` which adds its parser and sets
`func=run` (a function `run(args) -> int` returning the exit code). Modules must
not import torch, diffusers or ray at import time: `castbook --help`, `validate`,
`plan` and a fully cached `render` never need them.
"""
