"""The progress bar of a run, with the loop's log lines printed above it instead of through it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm  # plain text: no widget library needed in notebooks


class AboveTheBar:
    """A console stream that writes through ``tqdm.write``, so a log line lands above the bar."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        tqdm.write(text, file=self.stream, end="")

    def flush(self) -> None:
        self.stream.flush()


@contextmanager
def log_above_bar(bar: tqdm) -> Iterator[None]:
    """While the bar is shown, console log lines are written above it instead of through it.
    (tqdm's own helper for this imports its notebook-widget module, which warns in Jupyter.)"""
    handlers = [] if bar.disable else [
        h for lg in (logging.root, logging.getLogger("minigpt")) for h in lg.handlers
        if type(h) is logging.StreamHandler and h.stream in (sys.stdout, sys.stderr)]
    streams = [h.setStream(AboveTheBar(h.stream)) for h in handlers]
    try:
        yield
    finally:
        for handler, stream in zip(handlers, streams, strict=True):
            handler.setStream(stream)
