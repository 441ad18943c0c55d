"""Progress reporting that reads well on a terminal and in a log file.

:func:`progress` is the one progress helper of the project (copy pretraining, warm start, collection,
training, evaluation). On a terminal it returns a ``tqdm`` bar. Without one (SLURM, ``nohup``,
``> log 2>&1``) a bar would write ``\\r``-joined updates into the log, one line of kilobytes, so it
returns a :class:`PlainProgress` instead: a plain ``logging`` line (and so also in ``run.log``) at
every ``every_pct`` percent, at most one per ``min_interval_s`` seconds, at least one per
``every_s`` seconds while something moves, and one at the end::

    [12:00:05][ftrl.progress][INFO] collect r1: 64/128 ep (50%) in 12.3 s, eta 12 s; active=16, pending=48

``FTRL_PROGRESS=bar|plain|off`` overrides the choice. :func:`quiet_library_bars` turns the progress
bars of transformers / huggingface_hub / datasets ("Loading weights", "Writing model shards") off
when there is no terminal, since our own lines already say what happens.

    FTRL_PROGRESS=plain python -m ftrl.run +debug=smoke
    python -m pytest tests/test_progress.py -q
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from typing_extensions import Self

log = logging.getLogger(__name__)

PROGRESS_ENV = "FTRL_PROGRESS"
MODES = ("bar", "plain", "off")
EVERY_PCT = 10.0       # a plain line at every 10 % ...
MIN_INTERVAL_S = 5.0   # ... but not closer than 5 s apart (the final line always comes) ...
EVERY_S = 60.0         # ... and at least once a minute while the count moves
# Environment switches the Hugging Face libraries read when they are imported.
LIBRARY_BAR_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")


def progress_mode(stream: Any = None) -> str:
    """``bar`` on a terminal, else ``plain``; ``FTRL_PROGRESS`` (bar, plain, off) overrides."""
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if forced in MODES:
        return forced
    stream = sys.stderr if stream is None else stream
    try:
        return "bar" if stream.isatty() else "plain"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "plain"


def quiet_library_bars(mode: str | None = None) -> bool:
    """Turn the Hugging Face libraries' progress bars off unless progress is drawn as bars.

    Sets the environment switches (for libraries imported later) and calls the disable functions of
    those already imported; imports nothing itself. Returns whether the bars were turned off.
    """
    if (mode or progress_mode()) == "bar":
        return False
    for name in LIBRARY_BAR_ENV:
        os.environ.setdefault(name, "1")
    modules = sys.modules
    if "huggingface_hub" in modules:
        modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in modules:
        modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in modules:
        modules["datasets"].disable_progress_bars()
    return True


def _format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class PlainProgress:
    """A tqdm stand-in that logs plain lines (see the module docstring); the tqdm calls we use.

    ``update(n)``, ``set_postfix(**values)``, ``close()``, iteration over ``iterable``, and use as a
    context manager. ``clock`` is injectable for tests.
    """

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, every_pct: float = EVERY_PCT,
                 min_interval_s: float = MIN_INTERVAL_S, every_s: float = EVERY_S,
                 logger: logging.Logger | None = None, clock: Callable[[], float] = time.monotonic,
                 disable: bool = False) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.initial = initial
        self.every_pct = every_pct
        self.min_interval_s = min_interval_s
        self.every_s = every_s
        self.logger = logger or log
        self.clock = clock
        self.disable = disable
        self.lines: list[str] = []  # what was logged, in order (for tests and callers)
        self._postfix = ""
        self._started = clock()
        self._last_time = self._started
        self._last_n = initial
        self._next_pct = self._boundary_after(self._percent())
        self._closed = False

    def _percent(self) -> float:
        return 100.0 * self.n / self.total if self.total else 0.0

    def _boundary_after(self, percent: float) -> float:
        return (math.floor(percent / self.every_pct) + 1) * self.every_pct if self.every_pct > 0 else math.inf

    def format_line(self, now: float) -> str:
        elapsed = now - self._started
        if self.total:
            line = f"{self.desc}: {self.n}/{self.total} {self.unit} ({self._percent():.0f}%) in {_format_seconds(elapsed)}"
            moved = self.n - self.initial
            if 0 < moved and self.n < self.total:
                line += f", eta {_format_seconds(elapsed / moved * (self.total - self.n))}"
        else:
            line = f"{self.desc}: {self.n} {self.unit} in {_format_seconds(elapsed)}"
        return f"{line}; {self._postfix}" if self._postfix else line

    def _emit(self, now: float) -> None:
        line = self.format_line(now)
        self.lines.append(line)
        self.logger.info("%s", line)
        self._last_time, self._last_n = now, self.n
        self._next_pct = self._boundary_after(self._percent())

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable or self._closed:
            return
        now = self.clock()
        since = now - self._last_time
        finished = self.total is not None and self.n >= self.total
        crossed = self.total and self._percent() >= self._next_pct and since >= self.min_interval_s
        if finished or crossed or since >= self.every_s:
            self._emit(now)

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **values: Any) -> None:
        items = {**(dict(ordered_dict) if ordered_dict else {}), **values}
        self._postfix = ", ".join(f"{key}={value}" for key, value in items.items())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.disable and (self.n != self._last_n or (not self.lines and self.n > 0)):
            self._emit(self.clock())

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("PlainProgress: nothing to iterate (pass an iterable)")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", initial: int = 0, disable: bool = False, mode: str | None = None) -> Any:
    """A progress reporter: a ``tqdm`` bar on a terminal, else :class:`PlainProgress` log lines.

    Same calls either way: ``update(n)``, ``set_postfix(**values)``, ``close()``, iteration when
    ``iterable`` is given. ``disable=True`` (or ``FTRL_PROGRESS=off``) reports nothing.
    """
    mode = mode or progress_mode()
    if mode == "bar" and not disable:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True)
    quiet_library_bars(mode)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, initial=initial,
                         disable=disable or mode == "off")
