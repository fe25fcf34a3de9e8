"""A progress bar for the ``{"progress": ...}`` chunks a model load streams (demo and CLI).

The Transformers bridge streams, while it loads a model, ``{"progress": event}`` chunks: for the
one-time GGUF -> fp32 conversion ``convert_start``, ``convert_tokenizer_done``,
``convert_tensors`` (``done`` / ``total`` tensors), ``convert_weights_done``, ``convert_done``;
then ``load_start``, ``weights_loaded``, ``ready``; and a ``loading`` tick (``elapsed_s``) every
second while nothing else happens. :class:`ProgressBar` turns them into one line redrawn in
place on a terminal (``\\r``) or into plain lines otherwise, with an estimate of the time left
from the tensors converted so far.

No I/O except writes to the stream it is given; no dependency.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["ProgressBar"]

_STAGE_TEXT = {
    "convert_start": "converting the model once (GGUF -> fp32, cached for later runs)",
    "convert_tokenizer_done": "converting: tokenizer done, dequantising the weights",
    "convert_weights_done": "converting: weights done, saving the fp32 copy",
    "convert_done": "conversion done",
    "convert_wait": "another worker is converting this model; waiting for it",
    "load_start": "loading the model",
    "weights_loaded": "weights loaded",
    "ready": "model ready",
}


class ProgressBar:
    """Feed it progress events with :meth:`update`; call :meth:`finish` when the model answers."""

    def __init__(self, stream: TextIO | None = None, *, width: int = 30) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.monotonic()
        self.converting = False
        self.convert_t0: float | None = None
        self.tensors: tuple[int, int] | None = None
        self.tensors_t: float | None = None
        self.stage = "loading the model"
        self.shown = False
        self._last_plain: Any = None
        self.converted_in: float | None = None

    # ------------------------------------------------------------------ events
    def update(self, event: dict[str, Any]) -> None:
        stage = str(event.get("stage") or event.get("event") or "")
        now = time.monotonic()
        if stage == "convert_start":
            self.converting, self.convert_t0 = True, now
        elif stage == "convert_tensors":
            done, total = int(event.get("done", 0)), int(event.get("total", 0))
            if total > 0:
                self.tensors, self.tensors_t = (done, total), now
        elif stage == "convert_done":
            self.converted_in = float(event.get("elapsed_s") or 0.0) or None
            self.converting = False  # the bar is done; loading the saved copy follows
        if stage in _STAGE_TEXT:
            self.stage = _STAGE_TEXT[stage]
        elif stage == "convert_tensors" and self.tensors:
            self.stage = "converting: dequantising the weights"
        if stage == "loading" and not self.converting and not self.shown:
            return  # a quick load: no bar for the first tick
        self._draw(now)

    def finish(self) -> None:
        """End the bar's line (call before printing anything else)."""
        if self.shown and self.tty:
            self.stream.write("\n")
            self.stream.flush()
        self.shown = False

    # ------------------------------------------------------------------ drawing
    def line(self, now: float | None = None) -> str:
        """The current progress line (also what a non-terminal gets)."""
        now = time.monotonic() if now is None else now
        elapsed = now - self.t0
        if self.tensors is not None and self.converting:
            done, total = self.tensors
            frac = min(1.0, done / total)
            filled = round(frac * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            eta = ""
            if self.convert_t0 is not None and 0 < done < total and self.tensors_t is not None:
                spent = self.tensors_t - self.convert_t0
                left = spent / done * (total - done)
                eta = f", about {left:.0f}s left for the weights"
            return f"[{bar}] {done}/{total} tensors  {elapsed:4.0f}s  {self.stage}{eta}"
        return f"{self.stage}... {elapsed:.0f}s"

    def _key(self) -> Any:
        return (self.stage, self.tensors)

    def _draw(self, now: float) -> None:
        text = self.line(now)
        if self.tty:
            self.stream.write("\r" + text.ljust(100)[:160])
        elif self._key() != self._last_plain:  # one plain line per real change
            self._last_plain = self._key()
            self.stream.write(text + "\n")
        else:
            return
        self.stream.flush()
        self.shown = True
