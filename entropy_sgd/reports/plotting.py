"""Convergence plots of training runs, read from their TensorBoard events.

Every scalar is plotted against effective epochs (gradient evaluations x
batch / training examples), so SGD and Entropy-SGD compare at equal compute.
"""

import os
from typing import Dict, List, Sequence, Tuple

from matplotlib.figure import Figure  # No pyplot: no global backend.
import numpy as np

from entropy_sgd.reports import events

Series = events.Series


def plot_runs(run_dirs: Sequence[str], output: str,
              tags: Sequence[str] = ("test/accuracy", "train/loss")) -> str:
  """Writes one panel per tag, one line per run; returns `output`."""
  runs: List[Tuple[str, Dict[str, Series]]] = [
      (os.path.basename(os.path.normpath(d)), events.read_scalars(d))
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
