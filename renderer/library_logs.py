"""Library chatter goes to the run's log file, not the terminal.

diffusers, transformers, peft, accelerate and Ray log warnings that matter to someone debugging a
render ("Already found a peft_config", "No LoRA keys associated to CLIPTextModel...", deprecations)
but not to a cron job: `castbook render --quiet` must print nothing when it succeeds. Inside
`capture_library_output(lines)` their log records and Python warnings are appended to `lines`
instead of reaching stderr; on exit every logger, handler and the warnings hook are as before.
The actor returns its lines with each result (actors never write files), and the driver appends
them to `<run>/castbook.log`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

LIBRARY_LOGGERS = ("diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "ray", "timm",
                   "controlnet_aux", "open_clip", "torch", "py.warnings")


class _ListHandler(logging.Handler):
    def __init__(self, lines: list[str]):
        super().__init__(level=logging.WARNING)
        self.lines = lines
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a log line must never fail a render
            self.handleError(record)


@contextmanager
def capture_library_output(lines: list[str]) -> Iterator[list[str]]:
    handler = _ListHandler(lines)
    saved = []
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, list(logger.handlers), logger.propagate))
        logger.handlers = [handler]
        logger.propagate = False
    # logging keeps the original hook while it captures; a caller that already captures keeps doing so.
    already_captured = getattr(logging, "_warnings_showwarning", None) is not None
    logging.captureWarnings(True)
    try:
        yield lines
    finally:
        if not already_captured:
            logging.captureWarnings(False)
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate


def append_log(path, header: str, lines: list[str]) -> None:
    """Append `lines` under a header to a run's log (a plain append: the log is for people)."""
    if not lines:
        return
    with open(path, "a", encoding="utf-8", errors="backslashreplace") as fh:
        fh.write(f"== {header}\n" + "".join(line.rstrip("\n") + "\n" for line in lines))
