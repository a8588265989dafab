"""castbook: consistent SDXL characters at scale, from YAML specs in git."""

__version__ = "0.1.0"
