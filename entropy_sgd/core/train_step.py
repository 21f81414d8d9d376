"""One compiled training step for SGD, Nesterov and Entropy-SGD.

`make_train_step` returns a `tf.function` that performs outer steps of the
given optimizer: for Entropy-SGD, L inner SGLD iterations, each pulling its
own minibatch from the iterator, then the outer update, all in one graph.
Each gradient evaluation runs under `strategy.run`, with gradients
all-reduced across replicas before the update. An optimizer that
`needs_anchor_gradient` (Entropy-SGD with the `pytorch_reference`
conventions) also gets the gradient at x on a minibatch of its own before the
inner loop; no other optimizer pays for it. One call runs `num_steps`
outer steps (default 1) in a graph loop, which saves the per-call overhead
on small models.

Mixed precision lives in the model (`precision`: 16-bit compute, float32
variables, float32 logits), so the step sees float32 losses and gradients.
With a `precision.DynamicLossScale` (float16) the loss is scaled before the
backward pass and the gradients unscaled after the all-reduce; an update
whose gradients are not all finite on every replica is skipped
(`optimizer.skip_apply`: for Entropy-SGD x', mu and the momentum buffer stay
as they are, the inner step l still advances so the noise keys stay
aligned, and the outer step proceeds with the mu it has), and the scale is
halved.
"""

from typing import Callable, Mapping, Optional, Sequence

import sonnet as snt
import tensorflow as tf

from entropy_sgd.core import distribution
from entropy_sgd.core import onednn
from entropy_sgd.core import optimizers
from entropy_sgd.core import precision

onednn.advise_if_off()  # Library users import TensorFlow themselves.


def build_model(strategy: tf.distribute.Strategy,
                model_fn: Callable[[], snt.Module],
                input_shape: Sequence[int]) -> snt.Module:
  """Constructs `model_fn()` and creates its variables in `strategy.scope()`.

  BatchNorm statistics become replica-local (see `distribution`).
  """
  with strategy.scope(), distribution.replica_local_statistics():
    model = model_fn()
    model(tf.zeros([1, *input_shape]), is_training=False)
  return model


def classification_loss(logits, labels):
  """Per-example softmax cross-entropy."""
  return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)


def make_train_step(
    model: snt.Module,
    optimizer: optimizers.Optimizer,
    strategy: tf.distribute.Strategy,
    global_batch_size: int,
    jit_compile: bool = False,
    loss_scale: Optional[precision.DynamicLossScale] = None,
) -> Callable[[tf.distribute.DistributedIterator], Mapping[str, tf.Tensor]]:
  """Builds `train_step(iterator) -> metrics` for any of our optimizers.

  Args:
    model: a built module called as `model(images, is_training=...)`,
      returning logits.
    optimizer: `optimizers.SGD`, `optimizers.EntropySGD` or
      `optimizers.Parle`.
    strategy: the strategy whose scope holds the model.
    global_batch_size: examples per gradient evaluation, over all replicas;
      the loss of each replica is divided by it.
    jit_compile: compile each replica's forward and backward pass with XLA.
      (The optimizer's own `jit_compile` covers the update math.)
    loss_scale: dynamic loss scaling for float16 compute (created in
      `strategy.scope()`); None: gradients are used as computed.

  Returns:
    `train_step(iterator, num_steps=1) -> metrics`, taking an iterator over
    (per-replica) `(images, labels)` batches. A call runs `num_steps` outer
    steps (one compiled graph for every `num_steps`), consuming
    `num_steps * optimizer.batches_per_step` batches, and returns
    the mean training `loss` and `accuracy` over the batches passed to
    `optimizer.apply` (not the anchor-gradient batch of an optimizer that
    `needs_anchor_gradient`) plus the optimizer's diagnostics of the last
    outer step (`optimizer.diagnostics`, e.g. `gamma`,
    `anchor_to_mean_distance`). Metrics are float32 whatever the model's
    dtype; float64 models train in float64. With `loss_scale` the loss and
    accuracy cover the applied updates only, and the metrics add
    `loss_scale` (S after the call) and `skipped_updates` (updates of this
    call skipped for non-finite gradients).
  """
  if optimizer.perturbs_before_apply and loss_scale is not None:
    raise ValueError("SAM with float16 loss scaling is not implemented; use "
                     "float32 or mixed_bfloat16.")
  if global_batch_size % strategy.num_replicas_in_sync:
    raise ValueError(
        f"The global batch size {global_batch_size} is not divisible by the "
        f"{strategy.num_replicas_in_sync} replicas; choose a multiple.")
  parameters = list(model.trainable_variables)
  if not parameters:
    raise ValueError("The model has no trainable variables; build it first "
                     "(see build_model).")
  with strategy.scope():
    optimizer.initialize(parameters)

  # Synchronous training divides each replica's loss by the global batch
  # and sums the gradients; Parle's replicas each descend their own loss.
  if optimizer.all_reduces_gradients:
    loss_denominator = global_batch_size
  else:
    loss_denominator = global_batch_size // strategy.num_replicas_in_sync

  def forward_backward(images, labels):
    with tf.GradientTape() as tape:
      logits = model(images, is_training=True)
      per_example_loss = classification_loss(logits, labels)
      loss = tf.reduce_sum(per_example_loss) / loss_denominator
      if loss_scale is not None:
        loss = loss_scale.scale_loss(loss)
    gradients = tape.gradient(loss, parameters)
    if loss_scale is not None:
      gradients = loss_scale.unscale(gradients)
    correct = tf.equal(tf.argmax(logits, axis=-1, output_type=labels.dtype),
                       labels)
    return (gradients, tf.cast(tf.reduce_sum(per_example_loss), tf.float32),
            tf.reduce_sum(tf.cast(correct, tf.float32)))

  if jit_compile:
    forward_backward = tf.function(forward_backward, jit_compile=True)

  def replica_gradients(images, labels):
    gradients, loss_sum, num_correct = forward_backward(images, labels)
    if optimizer.all_reduces_gradients:
      gradients = tf.distribute.get_replica_context().all_reduce(
          tf.distribute.ReduceOp.SUM, gradients)
    return gradients, loss_sum, num_correct

  def replica_step(images, labels):
    gradients, loss_sum, num_correct = replica_gradients(images, labels)
    optimizer.apply(gradients, parameters)
    num_examples = tf.cast(tf.shape(labels)[0], tf.float32)
    return tf.stack([loss_sum, num_correct, num_examples])

  batch_norm_statistics = [
      v for m in model.submodules if isinstance(m, snt.BaseBatchNorm)
      for v in m.variables if not v.trainable]

  def replica_sam_step(images, labels):
    """SAM: the gradient at w, the ascent, the gradient at w + eps on the
    same batch, the descent. BatchNorm statistics keep the first pass's
    update only; the metrics are the first pass's (at w)."""
    gradients, loss_sum, num_correct = forward_backward(images, labels)
    if optimizer.all_reduces_first_gradient:
      gradients = tf.distribute.get_replica_context().all_reduce(
          tf.distribute.ReduceOp.SUM, gradients)
    optimizer.perturb(gradients, parameters)
    statistics = [v.read_value() for v in batch_norm_statistics]
    with tf.control_dependencies(statistics):
      perturbed_gradients, _, _ = replica_gradients(images, labels)
    with tf.control_dependencies(perturbed_gradients):
      for variable, value in zip(batch_norm_statistics, statistics):
        variable.assign(value)
    optimizer.apply(perturbed_gradients, parameters)
    num_examples = tf.cast(tf.shape(labels)[0], tf.float32)
    return tf.stack([loss_sum, num_correct, num_examples])

  def replica_begin_with_anchor_gradient(images, labels):
    gradients, _, _ = replica_gradients(images, labels)  # At x.
    if loss_scale is not None:  # An overflowed anchor gradient counts as 0.
      gradients = [tf.where(tf.math.is_finite(g), g, tf.zeros_like(g))
                   for g in gradients]
    optimizer.begin_outer_step(parameters, anchor_gradients=gradients)

  def replica_scaled_gradients(images, labels):
    gradients, loss_sum, num_correct = replica_gradients(images, labels)
    num_examples = tf.cast(tf.shape(labels)[0], tf.float32)
    nonfinite = 1.0 - tf.cast(precision.all_finite(gradients), tf.float32)
    return (gradients, tf.stack([loss_sum, num_correct, num_examples]),
            nonfinite)

  def replica_apply(gradients):
    optimizer.apply(gradients, parameters)

  def loss_scaled_step(images, labels, totals, skipped):
    """One gradient evaluation; the update is skipped unless all finite."""
    gradients, per_replica_totals, nonfinite = strategy.run(
        replica_scaled_gradients, args=(images, labels))
    # Every replica skips when any one overflowed (Parle's replicas differ).
    finite = tf.equal(strategy.reduce(tf.distribute.ReduceOp.SUM, nonfinite,
                                      axis=None), 0.0)

    def apply_update():
      strategy.run(replica_apply, args=(gradients,))
      return tf.constant(0)

    def skip_update():
      optimizer.skip_apply(parameters)
      return tf.constant(0)

    tf.cond(finite, apply_update, skip_update)
    loss_scale.update(finite)
    step_totals = strategy.reduce(tf.distribute.ReduceOp.SUM,
                                  per_replica_totals, axis=None)
    totals += tf.where(finite, step_totals, tf.zeros_like(step_totals))
    return totals, skipped + tf.cast(~finite, tf.float32)

  def outer_step(iterator, totals, skipped):
    if optimizer.needs_anchor_gradient:
      images, labels = next(iterator)
      strategy.run(replica_begin_with_anchor_gradient, args=(images, labels))
    else:
      strategy.run(optimizer.begin_outer_step, args=(parameters,))
    if optimizer.perturbs_before_apply:  # SAM: one batch, two passes.
      images, labels = next(iterator)
      per_replica = strategy.run(replica_sam_step, args=(images, labels))
      totals += strategy.reduce(
          tf.distribute.ReduceOp.SUM, per_replica, axis=None)
    for _ in tf.range(0 if optimizer.perturbs_before_apply
                      else optimizer.apply_calls_per_step):
      images, labels = next(iterator)
      if loss_scale is None:
        per_replica = strategy.run(replica_step, args=(images, labels))
        totals += strategy.reduce(
            tf.distribute.ReduceOp.SUM, per_replica, axis=None)
      else:
        totals, skipped = loss_scaled_step(images, labels, totals, skipped)
    per_replica_metrics = strategy.run(optimizer.end_outer_step,
                                       args=(parameters,))
    diagnostics = {
        name: tf.cast(strategy.reduce(tf.distribute.ReduceOp.MEAN, value,
                                      axis=None), tf.float32)
        for name, value in per_replica_metrics.items()}
    return totals, skipped, diagnostics

  @tf.function
  def compiled_step(iterator, num_steps):
    with strategy.scope():
      totals, skipped = tf.zeros([3]), tf.zeros([])
      diagnostics = {name: tf.zeros([]) for name in optimizer.diagnostics}
      for _ in tf.range(num_steps):
        totals, skipped, diagnostics = outer_step(iterator, totals, skipped)
    metrics = dict(diagnostics)
    metrics["loss"] = totals[0] / totals[2]
    metrics["accuracy"] = totals[1] / totals[2]
    if loss_scale is not None:
      metrics["loss_scale"] = tf.identity(loss_scale.scale.read_value())
      metrics["skipped_updates"] = skipped
    return metrics

  def train_step(iterator, num_steps=1):
    return compiled_step(iterator, tf.constant(num_steps, tf.int32))

  train_step.compiled = compiled_step  # The tf.function, for inspection.
  return train_step
