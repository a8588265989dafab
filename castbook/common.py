"""Argument helpers shared by the commands, and the one way errors are printed.

Commands raise; `castbook.cli.main` prints. A `CastbookError` becomes `castbook <command>: <message>`
(a `SpecErrors` becomes its located lines and a count) and the process exits with its `exit_code`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.errors import CastbookError, InputError
from schemas.loader import SpecErrors

ROOT_HELP = "project root: spec paths are relative to it (default: nearest folder above the spec with .git or pyproject.toml)"


def add_root_arg(parser: argparse.ArgumentParser) -> None:
    """`--root`, the same for every command that reads a spec."""
    parser.add_argument("--root", type=Path, default=None, help=ROOT_HELP)


def resolve_root(args: argparse.Namespace, spec_paths: list[Path] | Path) -> Path:
    """`--root` if given, else the project root found above the first spec (absolute, resolved)."""
    from schemas.paths import find_project_root

    if getattr(args, "root", None) is not None:
        if not Path(args.root).is_dir():
            raise InputError(f"--root {args.root} is not a folder; give the project folder that holds the spec's "
                             "files, or leave --root out to use the nearest folder with .git or pyproject.toml")
        return Path(args.root).resolve()
    first = spec_paths[0] if isinstance(spec_paths, (list, tuple)) else spec_paths
    return find_project_root(Path(first).absolute())


def add_spec_args(parser: argparse.ArgumentParser, many: bool = True) -> None:
    parser.add_argument("spec", nargs="+" if many else None, type=Path,
                        help="spec file(s); later files are merged into the first like includes")
    parser.add_argument("-s", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec value after loading, e.g. -s defaults.preset=draft (repeatable)")
    add_root_arg(parser)


def command_parser(subparsers, name: str, help: str, example: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(name, help=help, description=f"{help}\n\nExample:\n  {example}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def print_spec_errors(exc: SpecErrors) -> None:
    for error in exc.errors:
        print(str(error), file=sys.stderr)
    n = len(exc.errors)
    print(f"{n} error{'s' if n != 1 else ''}", file=sys.stderr)


def print_error(command: str, exc: CastbookError) -> None:
    """How every castbook error reaches the user: located spec lines, or one `castbook CMD: message`."""
    if isinstance(exc, SpecErrors):
        print_spec_errors(exc)
    else:
        print(f"castbook {command}: {exc}", file=sys.stderr)


def load_plan_args(args: argparse.Namespace, only: str | None = None):
    """Load and expand the spec named on the command line. Raises SpecErrors (printed by `main`)."""
    from schemas.plan import load_plan

    specs = args.spec if isinstance(args.spec, list) else [args.spec]
    return load_plan(specs, args.overrides, resolve_root(args, specs), only=only)


def check_output_root(out: Path, option: str = "--out") -> Path:
    """Create the output root if needed and prove it is writable, before any work. Raises InputError."""
    from core.paths import ensure_writable_folder

    fix = f"give {option} a folder you can write to (it is created if missing), e.g. {option} runs"
    return ensure_writable_folder(out, option, fix)
