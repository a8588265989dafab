"""`castbook` entry point: parse arguments, dispatch to a command module. No logic here."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from pathlib import Path

import castbook.commands
from castbook.common import print_error
from core.errors import INPUT_ERROR, CastbookError

# Offline, always: a hub lookup would otherwise retry for ~23 s before failing.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="castbook",
        description="Render consistent SDXL characters from YAML specs kept in git.",
        epilog="Example: castbook validate specs/examples/luca.yaml && castbook render specs/examples/luca.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from castbook import __version__

    parser.add_argument("--version", action="version", version=f"castbook {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in sorted(pkgutil.iter_modules(castbook.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"castbook.commands.{module.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Errors a user can cause end as a message and exit 2 (input) or 1 (a job
    or a gate failed), never a traceback; a traceback means a bug in castbook."""
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        # A file name that is not UTF-8 (or a lone surrogate from a spec) prints escaped, never crashes.
        sys.stdout.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CastbookError as err:
        print_error(args.command, err)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `castbook plan ... | head`: the reader left; say nothing more
        _silence_stdout()
        return 0
    except OSError as err:
        problem = _user_path_problem(err, args)
        if problem is None:
            raise  # not on a path the user gave: a bug to see with its traceback
        print(f"castbook {args.command}: {problem}", file=sys.stderr)
        return INPUT_ERROR


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _user_paths(args: argparse.Namespace) -> list[tuple[Path, str]]:
    """The paths named on the command line (with the argument's name), and the cache home."""
    from core.home import HOME_ENV, castbook_home

    paths: list[tuple[Path, str]] = []
    for name, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, Path):
                paths.append((item, name.replace("_", " ")))
    return [*paths, (castbook_home(), f"the cache {HOME_ENV}")]


def _user_path_problem(err: OSError, args: argparse.Namespace) -> str | None:
    """A message for an OSError on (or inside) a path the user named, else None."""
    names = [n for n in (err.filename, err.filename2) if isinstance(n, (str, bytes, os.PathLike))]
    for name in names:
        target = Path(os.fsdecode(name)).absolute()
        for given, label in _user_paths(args):
            given = given.absolute()
            # Inside the named path, beside it (a temp folder that becomes it) or a missing folder above it.
            if (target.is_relative_to(given) or target.parent == given.parent
                    or (given.is_relative_to(target) and not target.exists())):
                inside = ""
                if target != given:
                    inside = f" ({target.relative_to(given) if target.is_relative_to(given) else target})"
                return (f"{label} {given}: {err.strerror or type(err).__name__}{inside}; "
                        f"check that castbook can read and write there, or name another folder")
    return None


if __name__ == "__main__":
    raise SystemExit(main())
