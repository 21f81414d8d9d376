"""Durations and ETAs for long work (the training loop, the landscape tool).

    eta = chrono.Eta(total=4680)
    eta.start(done=0)              # after warm-up (e.g. the traced first call)
    ...
    logging.info("ETA %s", chrono.format_duration(eta.remaining(done)))
"""

import math
import time
from typing import Callable, Optional


def format_duration(seconds: float) -> str:
  """h:mm:ss, rounded to the second; "n/a" when not finite."""
  if seconds is None or not math.isfinite(seconds):
    return "n/a"
  seconds = int(round(max(seconds, 0.0)))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Eta:
  """Time left for `total` units at the rate measured since `start`.

  Units done before `start` (a resumed run's steps, a warm-up that included
  tracing) do not count towards the rate. Before any timed unit, `remaining`
  falls back to `fallback_seconds_per_unit` (None: unknown, NaN).
  """

  def __init__(self, total: float,
               clock: Callable[[], float] = time.perf_counter):
    self.total = total
    self._clock = clock
    self._start_time = None
    self._start_done = 0.0

  def start(self, done: float = 0.0):
    self._start_time = self._clock()
    self._start_done = done

  @property
  def started(self) -> bool:
    return self._start_time is not None

  def seconds_per_unit(self, done: float) -> Optional[float]:
    if self._start_time is None or done <= self._start_done:
      return None
    return (self._clock() - self._start_time) / (done - self._start_done)

  def remaining(self, done: float,
                fallback_seconds_per_unit: Optional[float] = None) -> float:
    rate = self.seconds_per_unit(done)
    if rate is None:
      rate = fallback_seconds_per_unit
    if rate is None:
      return math.nan
    return rate * max(self.total - done, 0.0)

  def elapsed(self) -> float:
    return 0.0 if self._start_time is None else self._clock() - self._start_time
