"""Recomputing BatchNorm statistics at given weights (the reference code's
"dry feed"), shared by the training loop's evaluation and the Hessian.

Reset every BatchNorm's moving averages, then run the model in training
mode without dropout over some batches: the statistics become those of the
current weights, and no weight changes. The callers choose the batches
(fresh training batches each epoch; fixed cached ones for the Hessian) and
run these inside `strategy.run`.
"""

from typing import List

import sonnet as snt
import tensorflow as tf


def batch_norms(model: snt.Module) -> List[snt.BatchNorm]:
  """The model's BatchNorm modules."""
  return [m for m in model.submodules if isinstance(m, snt.BatchNorm)]


def reset_statistics(norms: List[snt.BatchNorm]):
  for bn in norms:
    bn.moving_mean.reset()
    bn.moving_variance.reset()


def feed(model: snt.Module, images: tf.Tensor):
  """One training-mode forward pass with dropout off: it updates only the
  BatchNorm moving averages."""
  model(images, is_training=True, use_dropout=False)
