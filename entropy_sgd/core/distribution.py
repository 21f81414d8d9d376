"""The two tf.distribute idioms the optimizers and the training step rely on.

* `update_on_each_device` runs an update function once on every device that
  holds a (mirrored) variable, from replica or cross-replica context. Inside
  it every distributed variable reads and writes its local copy, so replicas
  apply the same all-reduced update without any further communication. It
  works the same under the default strategy, `MirroredStrategy`,
  `MultiWorkerMirroredStrategy` and `TPUStrategy`.
* `replica_local_statistics` makes non-trainable variables created in its
  scope (BatchNorm moving averages) replica-local, as Keras does for its own
  BatchNorm, so the forward pass may update them in replica context.
"""

import contextlib
import dataclasses
from typing import List
from unittest import mock

import tensorflow as tf


def update_on_each_device(colocate_with: tf.Variable, update_fn, *args):
  """Calls `update_fn(*args)` on every device that holds `colocate_with`.

  Args:
    colocate_with: a variable; `update_fn` runs once per copy of it.
    update_fn: builds the update; returns nothing useful.
    *args: tensors or per-replica values, unwrapped to the local device.
  """

  def merge_fn(strategy, *merged_args):
    def device_fn(unused_local_copy, *local_args):
      update_fn(*local_args)
      return tf.constant(0)

    strategy.extended.update(
        colocate_with, device_fn, args=merged_args, group=False)

  if tf.distribute.in_cross_replica_context():
    merge_fn(tf.distribute.get_strategy(), *args)
  else:
    tf.distribute.get_replica_context().merge_call(merge_fn, args=args)


def logical_cpus(num_devices: int):
  """Splits the CPU into `num_devices` logical devices; returns their names.

  For MirroredStrategy without GPUs (tests, benchmarks, --num_devices). It
  must run before TensorFlow starts up; afterwards the existing devices are
  returned, and there may be fewer than asked for.
  """
  cpu = tf.config.list_physical_devices("CPU")[0]
  try:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)
  except RuntimeError:
    pass  # TensorFlow already started: keep what exists.
  return [d.name for d in tf.config.list_logical_devices("CPU")][:num_devices]


def _variable_dtype(kwargs):
  if kwargs.get("dtype") is not None:
    return tf.as_dtype(kwargs["dtype"])
  initial_value = kwargs["initial_value"]
  if callable(initial_value):
    initial_value = initial_value()
  return tf.convert_to_tensor(initial_value).dtype


def _replica_local_creator(next_creator, **kwargs):
  auto = tf.VariableSynchronization.AUTO
  if (kwargs.get("trainable") is False and
      kwargs.get("synchronization", auto) == auto):
    kwargs["synchronization"] = tf.VariableSynchronization.ON_READ
    if _variable_dtype(kwargs).is_floating:
      kwargs["aggregation"] = tf.VariableAggregation.MEAN
    else:
      kwargs["aggregation"] = tf.VariableAggregation.ONLY_FIRST_REPLICA
  return next_creator(**kwargs)


@contextlib.contextmanager
def replica_local_statistics():
  """Creates non-trainable variables as replica-local (ON_READ) variables.

  Build models in this scope (inside `strategy.scope()`). Each replica then
  keeps BatchNorm statistics of its own batches; reading them outside a
  replica (checkpoints, cross-replica evaluation) averages the replicas.
  """
  with tf.variable_creator_scope(_replica_local_creator):
    yield


@dataclasses.dataclass(frozen=True)
class TracedAllReduce:
  """One `ReplicaContext.all_reduce` call seen while tracing a step."""
  loop_depth: int  # Number of while-loop bodies it was traced in.
  num_tensors: int
  num_bytes: int  # Per replica.


@contextlib.contextmanager
def record_all_reduces():
  """Records the all-reduce calls traced inside this scope.

  Used to count cross-replica reductions and bytes per step: a call inside
  a `tf.range` loop body runs once per iteration. Metric reductions through
  `strategy.reduce` (a few scalars) are not counted.
  """
  calls: List[TracedAllReduce] = []
  original = tf.distribute.ReplicaContext.all_reduce

  def recording_all_reduce(context, reduce_op, value, options=None):
    replica_id = tf.get_static_value(context.replica_id_in_sync_group)
    if replica_id:  # Count each call once, on replica 0.
      return original(context, reduce_op, value, options)
    tensors = tf.nest.flatten(value)
    loop_depth, graph = 0, tf.compat.v1.get_default_graph()
    while graph is not None:
      loop_depth += "while_body" in getattr(graph, "name", "")
      graph = getattr(graph, "outer_graph", None)
    calls.append(TracedAllReduce(
        loop_depth=loop_depth,
        num_tensors=len(tensors),
        num_bytes=sum(t.shape.num_elements() * t.dtype.size
                      for t in tensors)))
    return original(context, reduce_op, value, options)

  with mock.patch.object(tf.distribute.ReplicaContext, "all_reduce",
                         recording_all_reduce):
    yield calls


def per_step(calls: List[TracedAllReduce], loop_iterations: int,
             step_loop_depth: int = 1):
  """(all-reduce calls, bytes) executed per step, per replica.

  A call nested in more than `step_loop_depth` loops runs `loop_iterations`
  times per step (`train_step.make_train_step` runs its outer steps in one
  loop and the L inner steps in a loop inside it, so its depth is 1).
  """
  repeats = [loop_iterations if c.loop_depth > step_loop_depth else 1
             for c in calls]
  count = sum(repeats)
  num_bytes = sum(r * c.num_bytes for r, c in zip(repeats, calls))
  return count, num_bytes
