"""Helpers the tests share (testonly): toy data, batching, a relative
tolerance and a strategy over the local CPUs."""

from typing import Any, Mapping, Sequence, Union

import numpy as np
import tensorflow as tf


def make_data(num_batches: int, seed: int = 0, *, batch: int, features: int,
              classes: int, dtype=np.float32):
  """Gaussian features and uniform labels: (x [n, features], y [n])."""
  rng = np.random.RandomState(seed)
  x = rng.normal(size=(num_batches * batch, features)).astype(dtype)
  y = rng.randint(classes, size=num_batches * batch).astype(np.int32)
  return x, y


def batches_of(x, y, *, batch: int, dtype=None):
  """Consecutive (x, y) batches, x cast to `dtype` if given."""
  return [(x[i:i + batch] if dtype is None else x[i:i + batch].astype(dtype),
           y[i:i + batch]) for i in range(0, len(y), batch)]


def assert_close_relative(test, actual: Union[Mapping[str, Any], Sequence],
                          expected: Union[Mapping[str, Any], Sequence],
                          rtol: float = 1e-5):
  """max |a - e| / max(max |e|, 1e-3) <= rtol for each entry of `expected`
  (by key for mappings, by position for sequences)."""
  if isinstance(expected, Mapping):
    pairs = [(name, actual[name], expected[name]) for name in expected]
  else:
    test.assertLen(actual, len(expected))
    pairs = [(f"parameter {i}", a, e)
             for i, (a, e) in enumerate(zip(actual, expected))]
  for label, a, e in pairs:
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    scale = max(np.abs(e).max(), 1e-3)
    test.assertLessEqual(np.abs(a - e).max() / scale, rtol,
                         f"{label}: differs by {np.abs(a - e).max():.3g}")


def mirrored_strategy() -> tf.distribute.MirroredStrategy:
  """Over every logical CPU. Make one per process: TensorFlow's collective
  keys clash across several."""
  return tf.distribute.MirroredStrategy(
      [d.name for d in tf.config.list_logical_devices("CPU")])
