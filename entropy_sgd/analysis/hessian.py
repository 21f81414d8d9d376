"""The Hessian of the training loss at given weights: products and spectrum.

The loss is the one the optimizers descend, without weight decay:

    f(x) = (1/N) sum_i l(x; z_i)

over a fixed set of N training examples z_i (a few batches, or every full
batch of the training set), where l is the softmax cross-entropy of the
model called in inference mode: BatchNorm normalises with its moving
statistics (which `recalibrate_batch_norm` recomputes at x first, as the
evaluation of an Entropy-SGD run does) and dropout is off, so f is a
deterministic function of the trainable weights x.

Pieces, from the bottom up:

* `hessian_vector_product`: H v of any scalar loss by Pearlmutter's trick,
  forward-over-backward (`tf.autodiff.ForwardAccumulator` around the
  gradient tape) or double backprop (the gradient of g . v). On a 2-core
  CPU either costs 2.1-2.5 gradient evaluations on mnistfc and 3.1-3.3 on
  WRN-16-1 (`//bench:hessian_vector`); for a layer of matrix products 3 is
  the floor (9 products against the gradient's 3).
* `Batches` and `Objective`: f, its gradient and H v summed over the cached
  batches and over the replicas of a `tf.distribute` strategy (the default
  strategy or `MirroredStrategy`). Each replica weighs its examples by
  1/N, so the sum over batches and replicas is f's.
* `linear_algebra` (NumPy): Lanczos, power iteration, Hutchinson's trace
  and stochastic Lanczos quadrature on any `matvec(v) -> H v`, such as
  `Objective.hvp`.
* `FlatnessTracker`: a few power and Hutchinson iterations on two fixed
  batches, cheap enough to log during training.

Memory: Lanczos keeps every basis vector, i.e. iterations x parameters
values in the parameters' dtype (30 iterations of mnistfc: 220 MB; of
WRN-28-10: 4.4 GB).
"""

import contextlib
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import sonnet as snt
import tensorflow as tf

from entropy_sgd.analysis import linear_algebra
from entropy_sgd.core import batch_norm

HVP_METHODS = ("forward_over_backward", "double_backprop")

# ---------------------------------------------------------------- Products.


def cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  """Per-example softmax cross-entropy, twice differentiable.

  Equals `tf.nn.sparse_softmax_cross_entropy_with_logits`, whose fused
  kernel has no second derivative.
  """
  return (tf.reduce_logsumexp(logits, axis=-1) -
          tf.gather(logits, labels, axis=-1, batch_dims=1))


def hessian_vector_product(loss_fn: Callable[[], tf.Tensor],
                           parameters: Sequence[tf.Variable],
                           vector: Sequence[tf.Tensor],
                           method: str = "forward_over_backward"
                           ) -> List[tf.Tensor]:
  """H v, H the Hessian of the scalar `loss_fn()` w.r.t. `parameters`.

  `vector` holds one tensor per parameter. Parameters the loss does not
  depend on get zeros.
  """
  zero = tf.UnconnectedGradients.ZERO
  if method == "forward_over_backward":
    with tf.autodiff.ForwardAccumulator(parameters, vector) as accumulator:
      with tf.GradientTape() as tape:
        loss = loss_fn()
      gradients = tape.gradient(loss, parameters, unconnected_gradients=zero)
    return list(accumulator.jvp(gradients, unconnected_gradients=zero))
  if method == "double_backprop":
    with tf.GradientTape() as outer_tape:
      with tf.GradientTape() as tape:
        loss = loss_fn()
      gradients = tape.gradient(loss, parameters, unconnected_gradients=zero)
      directional = tf.add_n([tf.reduce_sum(g * v)
                              for g, v in zip(gradients, vector)])
    return outer_tape.gradient(directional, parameters,
                               unconnected_gradients=zero)
  raise ValueError(f"method must be one of {HVP_METHODS}; got {method!r}")


def classification_loss(model: snt.Module):
  """(images, labels) -> (per-example cross-entropy, per-example 0/1 hit)
  of `model` in inference mode (moving BatchNorm statistics, no dropout)."""

  def per_example(images, labels):
    logits = model(images, is_training=False)
    hits = tf.equal(tf.argmax(logits, -1, output_type=labels.dtype), labels)
    return cross_entropy(logits, labels), tf.cast(hits, logits.dtype)

  return per_example


# ------------------------------------------------------------------ Batches.


def _stack_per_replica(strategy, values):
  """Distributed values, one per batch -> one value stacking them per
  replica, on that replica's device."""
  per_batch = [strategy.experimental_local_results(v) for v in values]
  stacked = []
  for replica, first in enumerate(per_batch[0]):
    with tf.device(first.device):
      stacked.append(tf.stack([batch[replica] for batch in per_batch]))
  return strategy.experimental_distribute_values_from_function(
      lambda context: stacked[context.replica_id_in_sync_group])


class Batches:
  """N global batches read once and kept on the replicas' devices.

  Every computation over them sees the same examples in the same order,
  as Lanczos needs (one fixed operator). Each replica holds its shares
  of all N batches stacked, `[N, per-replica batch, ...]`.
  """

  def __init__(self, strategy: tf.distribute.Strategy,
               dataset_fn: Callable[[tf.distribute.InputContext],
                                    tf.data.Dataset],
               num_batches: int):
    """Reads `num_batches` global batches of `(images, labels)`.

    Args:
      strategy: the strategy whose replicas compute.
      dataset_fn: input context -> dataset of per-replica batches, as for
        `strategy.distribute_datasets_from_function`; batches must have
        one static size.
      num_batches: global batches to read.
    """
    if num_batches < 1:
      raise ValueError(f"num_batches must be >= 1; got {num_batches}")
    self.strategy = strategy
    self.num_batches = num_batches
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    images, labels = [], []
    for _ in range(num_batches):
      batch_images, batch_labels = next(iterator)
      images.append(batch_images)
      labels.append(batch_labels)
    self.num_examples = num_batches * sum(
        int(t.shape[0]) for t in strategy.experimental_local_results(
            labels[0]))
    self.images = _stack_per_replica(strategy, images)
    self.labels = _stack_per_replica(strategy, labels)


def _sum_over_batches(fn, zeros, images, labels, *args):
  """sum_i fn(images[i], labels[i], *args) over a replica's stacked batches.

  One batch at a time (parallel_iterations=1 bounds the memory).
  """

  def body(i, totals):
    values = fn(images[i], labels[i], *args)
    return i + 1, tf.nest.map_structure(tf.add, totals, values)

  _, totals = tf.while_loop(
      lambda i, _: i < tf.shape(images)[0], body, (tf.constant(0), zeros),
      parallel_iterations=1)
  return totals


# ---------------------------------------------------------------- Objective.


class Objective:
  """f(x), grad f(x) and H(x) v over fixed `Batches`, summed over replicas.

  f is the mean of `per_example_fn` over the batches' examples at the
  current values of `parameters` (variables created in the strategy's
  scope). Vectors are flat NumPy arrays in the order of `parameters`
  (`flatten`), in the parameters' dtype. Every pass over the batches is
  reported to `on_pass(kind, seconds)` (kind: "loss", "gradient", "hvp").
  """

  def __init__(self, per_example_fn, parameters: Sequence[tf.Variable],
               batches: Batches, method: str = "forward_over_backward",
               on_pass: Optional[Callable[[str, float], None]] = None):
    """Builds the compiled passes.

    Args:
      per_example_fn: (images, labels) -> (losses [b], hits [b]) for one
        replica's batch; hits may be zeros where accuracy has no meaning.
      parameters: the variables x (zero gradients and products for any
        the loss does not depend on).
      batches: the examples.
      method: an entry of `HVP_METHODS`.
      on_pass: called after every pass with its kind and duration.
    """
    if method not in HVP_METHODS:
      raise ValueError(f"method must be one of {HVP_METHODS}; got "
                       f"{method!r}")
    self.parameters = list(parameters)
    self.batches = batches
    self.method = method
    self.on_pass = on_pass
    self.shapes = [tuple(p.shape) for p in self.parameters]
    self.sizes = [int(np.prod(s)) for s in self.shapes]
    self.num_parameters = sum(self.sizes)
    self.dtype = self.parameters[0].dtype.as_numpy_dtype
    strategy = batches.strategy
    tf_dtype = self.parameters[0].dtype
    weight = 1.0 / batches.num_examples
    params = self.parameters

    def batch_loss(images, labels):
      losses, hits = per_example_fn(images, labels)
      return (tf.reduce_sum(losses) * weight, tf.reduce_sum(hits) * weight)

    def loss_of(images, labels):
      return lambda: batch_loss(images, labels)[0]

    def batch_gradient(images, labels):
      with tf.GradientTape() as tape:
        loss = loss_of(images, labels)()
      return loss, tape.gradient(
          loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def batch_hvp(images, labels, vector):
      return hessian_vector_product(loss_of(images, labels), params, vector,
                                    method)

    zero = tf.zeros([], tf_dtype)
    zero_vector = lambda: [tf.zeros(p.shape, p.dtype) for p in params]

    def reduced(replica_fn, *args):
      per_replica = strategy.run(replica_fn, args=(
          batches.images, batches.labels, *args))
      return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica,
                             axis=None)

    self._loss = tf.function(lambda: reduced(
        lambda i, l: _sum_over_batches(batch_loss, (zero, zero), i, l)))
    self._gradient = tf.function(lambda: reduced(
        lambda i, l: _sum_over_batches(batch_gradient, (zero, zero_vector()),
                                       i, l)))
    self._hvp = tf.function(lambda vector: reduced(
        lambda i, l, v: _sum_over_batches(batch_hvp, zero_vector(), i, l, v),
        vector))

  # Flat vectors.

  def flatten(self, tensors) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(t)) for t in tensors]).astype(
        self.dtype, copy=False)

  def unflatten(self, flat: np.ndarray) -> List[tf.Tensor]:
    parts = np.split(np.asarray(flat, self.dtype), np.cumsum(self.sizes)[:-1])
    return [tf.constant(part.reshape(shape))
            for part, shape in zip(parts, self.shapes)]

  def get_flat(self) -> np.ndarray:
    """x, flat."""
    return self.flatten([p.numpy() for p in self.parameters])

  def set_flat(self, flat: np.ndarray):
    """x <- flat (on every replica)."""
    for parameter, value in zip(self.parameters, self.unflatten(flat)):
      parameter.assign(value)

  # Passes over the batches.

  def _timed(self, kind, fn, *args):
    start = time.perf_counter()
    result = tf.nest.map_structure(lambda t: t.numpy(), fn(*args))
    if self.on_pass is not None:
      self.on_pass(kind, time.perf_counter() - start)
    return result

  def loss_and_accuracy(self) -> Tuple[float, float]:
    """(f(x), fraction of the examples classified correctly)."""
    loss, accuracy = self._timed("loss", self._loss)
    return float(loss), float(accuracy)

  def loss_and_gradient(self) -> Tuple[float, np.ndarray]:
    """(f(x), grad f(x) flat)."""
    loss, gradient = self._timed("gradient", self._gradient)
    return float(loss), self.flatten(gradient)

  def hvp(self, vector: np.ndarray) -> np.ndarray:
    """H(x) v for a flat v."""
    return self.flatten(self._timed("hvp", self._hvp, self.unflatten(vector)))

  def hvp_tensors(self, vector: Sequence[tf.Tensor]) -> List[tf.Tensor]:
    """H(x) v for v given per parameter; no NumPy round trip."""
    return self._hvp(list(vector))

  def gradient_tensors(self) -> List[tf.Tensor]:
    """grad f(x) per parameter; no NumPy round trip."""
    return self._gradient()[1]


# ---------------------------------------------------------------- BatchNorm.


class BatchNormRecalibration:
  """Recomputes the BatchNorm statistics at the current weights; call it.

  With `core.batch_norm`, as the training loop's evaluation: resets the moving
  averages and feeds every cached batch in training mode, without
  dropout (`use_dropout=False`) and without
  updating any weight. With several replicas each replica has then seen
  its own shares; they are replaced by their mean over replicas, so every
  replica normalises alike and the Hessian is one operator. Compiled once,
  so calling it at many weights (interpolation) traces once.
  """

  def __init__(self, model: snt.Module, batches: Batches):
    self._norms = batch_norm.batch_norms(model)
    self._batches = batches
    strategy = batches.strategy

    def feed(images, unused_labels):
      def body(i):
        batch_norm.feed(model, images[i])
        return i + 1
      tf.while_loop(lambda i: i < tf.shape(images)[0], body,
                    (tf.constant(0),), parallel_iterations=1)

    @tf.function
    def recalibrate(images, labels):
      strategy.run(lambda: batch_norm.reset_statistics(self._norms))
      strategy.run(feed, args=(images, labels))

    self._recalibrate = recalibrate

  def __call__(self):
    if not self._norms:
      return
    self._recalibrate(self._batches.images, self._batches.labels)
    if self._batches.strategy.num_replicas_in_sync > 1:
      for bn in self._norms:
        for variable in (bn.moving_mean.variables +
                         bn.moving_variance.variables):
          if variable.dtype.is_floating:
            variable.assign(variable.read_value())  # Mean over replicas.


def recalibrate_batch_norm(model: snt.Module, batches: Batches):
  """Recomputes the BatchNorm statistics at the current weights, once (see
  `BatchNormRecalibration`)."""
  BatchNormRecalibration(model, batches)()


@contextlib.contextmanager
def preserved_state(model: snt.Module, strategy: tf.distribute.Strategy):
  """Restores every variable of `model`, on every replica, on exit.

  So measurements that move the weights or recalibrate BatchNorm leave the
  model exactly as they found it.
  """
  saved = [[tf.identity(c) for c in strategy.experimental_local_results(v)]
           for v in model.variables]
  try:
    yield
  finally:
    for variable, values in zip(model.variables, saved):
      for component, value in zip(
          strategy.experimental_local_results(variable), values):
        component.assign(value)


# ------------------------------------------------------ During training.


class FlatnessTracker:
  """lambda_max and tr(H) at the model's weights, cheaply, during training.

  On a fixed set of `num_batches` batches (read on first use): saves every
  model variable, recalibrates BatchNorm at the current weights on those
  batches, runs `iterations` power iterations (warm-started from the
  previous call's eigenvector) and a Hutchinson estimate with `iterations`
  probes, then restores every variable, so training continues exactly as
  without it. With few iterations lambda_max is a lower bound and the
  trace a noisy estimate; they show trends, `//launch:landscape` measures.
  """

  def __init__(self, model: snt.Module, strategy: tf.distribute.Strategy,
               dataset_fn, num_batches: int = 2, iterations: int = 10,
               seed: int = 0):
    self._model, self._strategy = model, strategy
    self._dataset_fn, self._num_batches = dataset_fn, num_batches
    self._iterations, self._seed = iterations, seed
    self._objective = self._recalibrate = None
    self._eigenvector = None

  def measure(self) -> Dict[str, float]:
    """{"flatness/lambda_max": ..., "flatness/hessian_trace": ...}."""
    if self._objective is None:
      batches = Batches(self._strategy, self._dataset_fn, self._num_batches)
      self._objective = Objective(classification_loss(self._model),
                                  self._model.trainable_variables, batches)
      self._recalibrate = BatchNormRecalibration(self._model, batches)
    objective = self._objective
    with preserved_state(self._model, self._strategy):
      self._recalibrate()
      start = self._eigenvector
      if start is None:
        start = np.random.default_rng(self._seed).standard_normal(
            objective.num_parameters).astype(objective.dtype)
      power = linear_algebra.power_iteration(objective.hvp, start, self._iterations)
      trace = linear_algebra.hutchinson_trace(objective.hvp, objective.num_parameters,
                               max(2, self._iterations), self._seed,
                               objective.dtype)
    self._eigenvector = power.eigenvector
    return {"flatness/lambda_max": power.eigenvalue,
            "flatness/hessian_trace": trace.mean}
