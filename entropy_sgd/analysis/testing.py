"""Helpers the analysis tests share (testonly)."""

import numpy as np
import sonnet as snt
import tensorflow as tf

from entropy_sgd.analysis import hessian


def random_symmetric(spectrum, seed=0):
  """Q diag(spectrum) Q^T for a random orthogonal Q."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((len(spectrum), len(spectrum))))
  return (q * spectrum) @ q.T


class Quadratic(snt.Module):
  """f(x) = 1/2 x^T A x + b^T x of one float64 variable x."""

  def __init__(self, matrix, x0, linear=None):
    super().__init__()
    self.matrix = tf.constant(matrix, tf.float64)
    self.linear = tf.constant(np.zeros(len(x0)) if linear is None else linear,
                              tf.float64)
    self.x = tf.Variable(np.asarray(x0, np.float64), name="x")

  def __call__(self):
    x = self.x
    return (0.5 * tf.tensordot(x, tf.linalg.matvec(self.matrix, x), 1) +
            tf.tensordot(self.linear, x, 1))


def constant_batches(num_batches=1, batch_size=1, strategy=None):
  """`hessian.Batches` of zero images, for objectives that ignore them."""
  strategy = strategy or tf.distribute.get_strategy()
  dataset = tf.data.Dataset.from_tensors(
      (tf.zeros([batch_size, 1]), tf.zeros([batch_size], tf.int32))).repeat()
  return hessian.Batches(strategy, lambda context: dataset, num_batches)


def quadratic_objective(quadratic, batch_size=1, **objective_kwargs):
  """The `hessian.Objective` whose every example's loss is `quadratic()`
  (accuracy 0)."""
  def per_example(images, unused_labels):
    ones = tf.ones([tf.shape(images)[0]], tf.float64)
    loss = quadratic()
    return loss * ones, 0.0 * loss * ones

  return hessian.Objective(per_example, [quadratic.x],
                           constant_batches(batch_size=batch_size),
                           **objective_kwargs)


class NumpyQuadraticObjective:
  """f(x) = 1/2 x^T A x in NumPy with the accessors the sampling measures
  use (`get_flat`, `set_flat`, `loss_and_accuracy`), for closed-form tests
  that evaluate f tens of thousands of times. Its accuracy is
  `accuracy(loss)`, or 0 without one (PAC-Bayes flatness reads it as
  1 - error)."""

  def __init__(self, matrix, x0, accuracy=None):
    self._matrix = np.asarray(matrix, np.float64)
    self._x = np.array(x0, np.float64)
    self._accuracy = accuracy

  def get_flat(self):
    return self._x.copy()

  def set_flat(self, flat):
    self._x = np.array(flat, np.float64)

  def loss_and_accuracy(self):
    loss = 0.5 * self._x @ self._matrix @ self._x
    return loss, self._accuracy(loss) if self._accuracy else 0.0
