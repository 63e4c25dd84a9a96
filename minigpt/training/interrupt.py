"""Stopping a run cleanly on Ctrl-C (SIGINT) or SIGTERM, losing nothing.

The one idea: by default Ctrl-C raises ``KeyboardInterrupt`` wherever the program happens
to be, perhaps half-way through an optimizer step or a checkpoint. Inside
:class:`GracefulInterrupt` the signal only *records* the request; the training loop looks
at it between optimizer steps, saves a checkpoint, and stops::

    with GracefulInterrupt() as interrupt:
        while training:
            one_optimizer_step()
            if interrupt.requested:
                with interrupt.save_guard():
                    save_checkpoint()
                sys.exit(interrupt.exit_code)   # 130 after Ctrl-C, 143 after SIGTERM

A second signal while the checkpoint is being saved is ignored (the save is short and
is what the user is waiting for). A second one before the save starts is ignored too,
with a warning; a third stops at once with ``KeyboardInterrupt``, for a step that hangs.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class GracefulInterrupt:
    """Context manager: SIGINT and SIGTERM set :attr:`requested` instead of raising.

    Attributes: ``requested`` (a stop was asked for), ``signum`` (the first signal's
    number), ``saving`` (inside :meth:`save_guard`: further signals are ignored),
    ``count`` (signals received). The previous handlers come back on exit. Signal
    handlers can only be set in the main thread; elsewhere this is a no-op that never
    requests a stop.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self.saving = False
        self.count = 0
        self._previous: dict[int, Any] = {}

    @property
    def exit_code(self) -> int:
        """The shell's code for death by this signal, ``128 + signum``: 130 for SIGINT,
        143 for SIGTERM (0 when no stop was requested)."""
        return 128 + self.signum if self.signum is not None else 0

    @property
    def signal_name(self) -> str:
        return _NAMES.get(self.signum, f"signal {self.signum}") if self.signum is not None else ""

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @contextmanager
    def save_guard(self) -> Iterator[None]:
        """Inside: signals are recorded but never interrupt (a checkpoint being saved)."""
        saving, self.saving = self.saving, True
        try:
            yield
        finally:
            self.saving = saving

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if not self.requested:
            self.requested = True
            self.signum = signum
            logger.warning("%s: finishing this step, saving a checkpoint, then stopping", self.signal_name)
        elif self.saving:
            logger.warning("still saving the checkpoint: it will be complete in a moment")
        elif self.count == 2:
            logger.warning("already stopping after this step; press Ctrl-C once more to stop at once, "
                           "losing the work since the last checkpoint")
        else:
            raise KeyboardInterrupt
