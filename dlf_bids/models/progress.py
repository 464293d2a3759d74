"""Training progress: a tqdm bar on a terminal, plain lines in a log.

tqdm redraws one line with carriage returns, which a batch log (SLURM, ``nohup``) shows as one
ever-growing line, or not at all (``disable=None`` turns it off when stderr is not a terminal).
There, :class:`LogProgress` prints one line per tenth of the run instead: count, rate and the
latest figures, so a job's log says how far it got and how fast."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


def training_progress(total: int, desc: str, unit: str = "it", enabled: bool = True):
    """An object with tqdm's ``update``, ``set_postfix`` and ``close``."""
    if not enabled:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
    return LogProgress(total, desc, unit)


class LogProgress:
    def __init__(self, total: int, desc: str, unit: str = "it", parts: int = 10, stream=None):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.stream = stream or sys.stderr
        self.step = max(1, -(-self.total // parts))
        self.n, self.postfix, self.started = 0, {}, time.perf_counter()

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if self.n // self.step > before // self.step or (self.n >= self.total > before):
            self._line()

    def set_postfix(self, refresh: bool = False, **figures) -> None:
        self.postfix = figures

    def close(self) -> None:
        pass

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.started
        figures = "".join(f", {k} {v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n // max(self.total, 1)} %), "
              f"{elapsed / max(self.n, 1):.2f} s/{self.unit}{figures}", file=self.stream, flush=True)
