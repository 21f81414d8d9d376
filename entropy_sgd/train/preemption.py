"""SIGTERM and SIGINT while training: finish the step, save, then exit."""

import os
import signal
import threading

from absl import logging


class Preempted(RuntimeError):
  """SIGTERM or SIGINT stopped the run after a checkpoint; rerun resumes."""


class StopRequest:
  """Records SIGTERM/SIGINT instead of dying, while training runs.

  The training loop finishes its current call (no finished outer step is
  lost), saves and raises `Preempted`. A second signal kills the process
  the usual way. Only the main thread can install handlers; elsewhere this
  does nothing.
  """

  def __init__(self):
    self.signal, self._previous = None, {}

  @property
  def name(self) -> str:
    return signal.Signals(self.signal).name

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None:  # Second signal: die as usual.
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      os.kill(os.getpid(), signum)
      return
    self.signal = signum
    logging.warning("%s received: finishing the current step, then saving a "
                    "checkpoint and exiting (send it again to exit now).",
                    signal.Signals(signum).name)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *unused_exc_info):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
