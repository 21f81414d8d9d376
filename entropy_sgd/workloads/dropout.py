"""Keyed dropout, shared by every model: resume-exact and replica-agnostic.

A model counts its training calls in a variable (checkpointed with it).
Call c draws its masks from the Philox key fold_in([seed, 0], c), and its
k-th dropout layer from fold_in(that key, k): the masks depend on the seed,
the call and the layer only, so a resumed run draws what an uninterrupted
one would have, unlike a stateful `snt.Dropout`.
"""

from typing import Optional

import tensorflow as tf


def call_counter() -> tf.Variable:
  """Training calls so far; keys the dropout masks."""
  return tf.Variable(tf.constant(0, tf.int64), trainable=False,
                     name="dropout_calls")


class KeyedDropout:
  """The dropout state of one model: its seed and its count of calls.

  In the model's `__init__`: `self.dropout_calls = call_counter()` (a
  variable of the model, so checkpoints hold it) and
  `KeyedDropout(seed, self.dropout_calls)`; then `begin_call` at the start
  of each forward pass and `__call__` once per dropout layer, in a fixed
  order.
  """

  def __init__(self, seed: int, calls: tf.Variable):
    self.seed = seed
    self.calls = calls
    self._call_key = None
    self._layer = 0

  def begin_call(self, is_training: bool,
                 use_dropout: Optional[bool]) -> bool:
    """Starts a forward pass; returns whether dropout is on (by default in
    training; `use_dropout` overrides, e.g. False for BatchNorm
    recalibration)."""
    self._layer = 0
    on = is_training if use_dropout is None else use_dropout
    if on:
      self._call_key = tf.random.experimental.stateless_fold_in(
          tf.constant([self.seed, 0], tf.int64), self.calls, alg="philox")
      self.calls.assign_add(1)
    return on

  def __call__(self, net: tf.Tensor, rate: float, on: bool) -> tf.Tensor:
    """The next dropout layer of this pass (counted even when off)."""
    self._layer += 1
    if not on or rate == 0:
      return net
    key = tf.random.experimental.stateless_fold_in(self._call_key,
                                                   self._layer, alg="philox")
    return tf.nn.experimental.stateless_dropout(net, rate=rate, seed=key)
