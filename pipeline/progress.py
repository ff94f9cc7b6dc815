"""Progress for long work: tqdm's bar on a terminal; in a log (SLURM output, `docker run` without -t, a
pipe) whole lines at most every `LOG_INTERVAL` seconds, without carriage returns or escape codes."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

LOG_INTERVAL = 30.0  # seconds between progress lines in a log
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) in {elapsed}, {rate_fmt}, {remaining} left"
LOG_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit} in {elapsed}, {rate_fmt}"


class LogLines(tqdm):
    """tqdm writing one plain line per refresh (and one at the end) instead of redrawing a bar. It never
    `leave`s a bar: tqdm then ends with one more display, the final line, and writes nothing after it."""

    def display(self, msg: str | None = None, pos: int | None = None) -> None:
        self.fp.write(self.format_meter(**self.format_dict) + "\n")
        self.fp.flush()


def progress(iterable: Any = None, *, log_interval: float = LOG_INTERVAL, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)`, or `LogLines` when stderr is not a terminal."""
    if sys.stderr.isatty():
        return tqdm(iterable, **kwargs)
    for key in ("bar_format", "mininterval", "maxinterval"):
        kwargs.pop(key, None)
    kwargs["leave"] = False
    total = kwargs.get("total", len(iterable) if hasattr(iterable, "__len__") else None)
    fmt = LOG_FORMAT if total else LOG_FORMAT_NO_TOTAL
    return LogLines(iterable, bar_format=fmt, mininterval=log_interval, maxinterval=max(log_interval, 10.0),
                    **{**kwargs, "unit": kwargs.get("unit", "it").strip()})
