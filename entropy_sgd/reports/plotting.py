"""Convergence plots of training runs, read from their TensorBoard events.

Every scalar is plotted against effective epochs (gradient evaluations x
batch / training examples), so SGD and Entropy-SGD compare at equal compute.
"""

import os
from typing import Dict, List, Sequence, Tuple

from matplotlib.figure import Figure  # No pyplot: no global backend.
import numpy as np
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

Series = Tuple[np.ndarray, np.ndarray]  # (effective epochs, values)


def read_scalars(run_dir: str) -> Dict[str, Series]:
  """All scalars of a run, keyed by tag, against effective epochs."""
  accumulator = event_accumulator.EventAccumulator(
      run_dir, size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  raw = {}
  for tag in accumulator.Tags()["tensors"]:
    events = accumulator.Tensors(tag)
    values = [tf.make_ndarray(e.tensor_proto) for e in events]
    if any(v.ndim or v.dtype.kind not in "fiu" for v in values):
      continue  # Not a scalar series (e.g. the hparams summary).
    raw[tag] = (np.array([e.step for e in events], np.float64),
                np.array([float(v) for v in values]))
  if "progress/effective_epoch" not in raw:
    raise ValueError(f"{run_dir} has no progress/effective_epoch scalar; "
                     f"is it a run directory of entropy_sgd.train.training?")
  steps, epochs = raw["progress/effective_epoch"]
  epochs_per_step = epochs[-1] / steps[-1]
  return {tag: (s * epochs_per_step, v) for tag, (s, v) in raw.items()}


def plot_runs(run_dirs: Sequence[str], output: str,
              tags: Sequence[str] = ("test/accuracy", "train/loss")) -> str:
  """Writes one panel per tag, one line per run; returns `output`."""
  runs: List[Tuple[str, Dict[str, Series]]] = [
      (os.path.basename(os.path.normpath(d)), read_scalars(d))
      for d in run_dirs]
  figure = Figure(figsize=(6 * len(tags), 4.5))
  axes = figure.subplots(1, len(tags))
  for axis, tag in zip(np.atleast_1d(axes), tags):
    for name, scalars in runs:
      if tag in scalars:
        epochs, values = scalars[tag]
        axis.plot(epochs, values, marker="o" if len(values) < 30 else None,
                  label=name)
    axis.set_xlabel("effective epochs")
    axis.set_ylabel(tag)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(output, dpi=110)
  return output
