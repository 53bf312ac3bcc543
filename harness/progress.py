"""Progress of a study stage with an estimate of the time left: a tqdm bar on a terminal, lines in logs.

    bar = Progress(12, "train", "epoch", log=study.log)
    bar.update(1, "em_capsnet_small seed 0 epoch 3/6")
    bar.close()

On a terminal (stderr is a TTY) it is a tqdm bar (tqdm estimates the time left). Otherwise each change
becomes one plain line through ``log``, e.g. ``train: 3/12 epochs (em_capsnet_small seed 0 epoch 3/6),
41 s elapsed, about 2.1 min left``; the estimate is the mean time per unit since the bar started times
the units left (units done before it started, e.g. by an interrupted run, are not counted in the rate).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from tqdm.auto import tqdm


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class Progress:
    def __init__(
        self,
        total: int,
        what: str,
        unit: str,
        *,
        done: int = 0,
        log: Callable[[str], None] = print,
        tty: bool | None = None,
    ):
        self.total, self.what, self.unit, self.log = total, what, unit, log
        self.done = self.start_done = done
        self.note = ""
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.bar = (
            tqdm(total=total, initial=done, desc=what, unit=unit, dynamic_ncols=True) if self.tty else None
        )

    def update(self, n: int = 1, note: str = "") -> None:
        self.set(self.done + n, note)

    def set(self, done: int, note: str = "") -> None:
        """Move to ``done`` units; a line is written (off a terminal) only when something changed."""
        if done == self.done and note == self.note:
            return
        self.done, self.note = done, note
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(note, refresh=False)
            self.bar.refresh()
        else:
            self.log(self.line())

    def skip(self, n: int) -> None:
        """Units done elsewhere (e.g. the epochs an interrupted run already has): not counted in the rate."""
        self.start_done += n
        self.done += n
        if self.bar is not None:
            self.bar.n = self.done
            self.bar.refresh()

    def left_seconds(self, elapsed: float) -> float | None:
        """Mean seconds per unit since the start × units left; None before the first unit."""
        made = self.done - self.start_done
        if made <= 0:
            return None
        return elapsed / made * max(0, self.total - self.done)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        units = self.unit + ("" if self.total == 1 else "s")
        text = f"{self.what}: {self.done}/{self.total} {units}" + (f" ({self.note})" if self.note else "")
        text += f", {duration(elapsed)} elapsed"
        if self.done >= self.total:
            return text + ", done"
        left = self.left_seconds(elapsed)
        return text + (f", about {duration(left)} left" if left is not None else ", estimating time left")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
