"""The castbook home: machine-local caches (built-in models built from config, embeddings)."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "CASTBOOK_HOME"


def castbook_home() -> Path:
    """`$CASTBOOK_HOME`, else `~/.cache/castbook`."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "castbook"


def builtins_dir() -> Path:
    """Where built-in models built from config are saved once (then always loaded from files)."""
    return castbook_home() / "builtins"
