"""oneDNN on wherever it helps, and said so.

TensorFlow enables its oneDNN CPU kernels by default only on CPUs with
AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX; elsewhere (e.g. AMD EPYC with
AVX2 only) they are off unless TF_ENABLE_ONEDNN_OPTS=1 is set before
TensorFlow is imported. On such a CPU the WRN-16-1 training step took 1.90x
longer with the default (issue 18's measurement: 775.9 against 408.1 ms per
gradient evaluation). So:

* launchers, benchmarks and tools call `enable_before_tensorflow()` before
  anything imports TensorFlow, and log `launcher_message()`; a value the
  user set is left alone;
* library and Keras users import TensorFlow themselves: `advise_if_off()`
  (called when `entropy_sgd.core.train_step` or the Keras plugin is imported)
  logs one line with the fix when oneDNN is off.

This module imports nothing heavy, so it can run first.
"""

import os
import sys
from typing import Optional

ENV = "TF_ENABLE_ONEDNN_OPTS"
# CPU flags (as /proc/cpuinfo spells them) with which TensorFlow turns
# oneDNN on by itself on Linux (tensorflow/core/util/port.cc,
# DefaultOneDnnPolicy).
AUTO_ON_FLAGS = ("avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16",
                 "amx_tile", "amx_int8")

_decision: Optional[str] = None  # What enable_before_tensorflow did.
_advised = False


def enable_before_tensorflow(environ=None) -> str:
  """Sets TF_ENABLE_ONEDNN_OPTS=1 unless the user set it or TensorFlow is
  already imported; returns what it did, as one sentence."""
  global _decision
  environ = os.environ if environ is None else environ
  if ENV in environ:
    _decision = (f"oneDNN: {ENV}={environ[ENV]} was set by you; left as "
                 f"it is.")
  elif "tensorflow" in sys.modules:
    _decision = (f"oneDNN: TensorFlow was imported before the launcher "
                 f"could set {ENV}; left at TensorFlow's default.")
  else:
    environ[ENV] = "1"
    _decision = (f"oneDNN: turned on ({ENV}=1) for TensorFlow's CPU "
                 f"kernels; set {ENV}=0 to turn it off.")
  return _decision


def launcher_message() -> str:
  return _decision or "oneDNN: left at TensorFlow's default."


def cpu_flags(path: str = "/proc/cpuinfo") -> set:
  try:
    with open(path) as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


def is_on(environ=None, flags=None) -> Optional[bool]:
  """Whether TensorFlow runs with oneDNN: the variable if set, else
  TensorFlow's own rule from the CPU flags (None on non-Linux hosts, where
  the flags cannot be read)."""
  environ = os.environ if environ is None else environ
  if ENV in environ:
    return environ[ENV].strip().lower() in ("1", "true")
  flags = cpu_flags() if flags is None else flags
  if not flags:
    return None
  return any(flag in flags for flag in AUTO_ON_FLAGS)


def advise_if_off(log=None, environ=None, flags=None) -> Optional[str]:
  """Logs, once per process, how to turn oneDNN on when it is off."""
  global _advised
  if _advised or is_on(environ, flags) is not False:
    return None
  _advised = True
  message = (f"oneDNN is off on this CPU (TensorFlow enables it only with "
             f"AVX512_VNNI/BF16 or AMX): set {ENV}=1 before importing "
             f"TensorFlow; with it the WRN training step ran 1.9x faster on "
             f"an AVX2-only CPU (issue 18).")
  if log is None:
    from absl import logging  # pylint: disable=g-import-not-at-top
    log = logging.warning
  log(message)
  return message
