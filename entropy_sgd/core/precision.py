"""Mixed precision: 16-bit compute over float32 master weights.

Three precisions (`--precision`):

* "float32" (default): everything in float32, as before.
* "mixed_bfloat16": forward and backward passes in bfloat16; no loss
  scaling (bfloat16 has float32's exponent range).
* "mixed_float16": forward and backward passes in float16 with dynamic loss
  scaling (`DynamicLossScale`); an update whose gradients overflow is
  skipped.

Conventions, all named here:

* **Master weights stay float32.** A layer of this module creates its
  variables in float32 when it first sees 16-bit inputs (in its input's
  dtype otherwise, so float64 models stay float64), and casts them to its
  input's dtype in every call. The gradient of the loss with respect to a
  float32 variable is float32, so the optimizers, their state (anchor x,
  mean mu, momentum buffers) and the Langevin noise stay float32: a noise of
  std ~3e-5 added to a bfloat16 x' (resolution ~4e-3 relative) would vanish.
* **The model casts.** A model built with `compute_dtype` casts its input
  images to it and its logits back to float32 (`to_compute`,
  `logits_to_float32`); the loss is computed in float32.
* **BatchNorm statistics stay float32.** The fused NHWC kernel takes 16-bit
  inputs with float32 scale, offset and statistics and returns float32 batch
  moments, so it runs as is. The unfused path (rank-2 inputs and
  `CrossReplicaBatchNorm`) normalises in float32: the input is cast up and
  the output back down.
* With `compute_dtype=None` (float32) every layer computes exactly what the
  plain Sonnet layer computes: no cast is added.
"""

from typing import Optional, Sequence

import sonnet as snt
import tensorflow as tf

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
_COMPUTE_DTYPES = {"float32": None, "mixed_bfloat16": tf.bfloat16,
                   "mixed_float16": tf.float16}
_HALF_DTYPES = (tf.bfloat16, tf.float16)


def compute_dtype(precision: str) -> Optional[tf.DType]:
  """The compute dtype of `precision`; None for float32 (no casts)."""
  if precision not in _COMPUTE_DTYPES:
    raise ValueError(f"--precision={precision!r} is unknown; choose one of "
                     f"{', '.join(PRECISIONS)}.")
  return _COMPUTE_DTYPES[precision]


def uses_loss_scaling(precision: str) -> bool:
  """Whether `precision` needs dynamic loss scaling (float16 only)."""
  return compute_dtype(precision) == tf.float16


def is_half(dtype) -> bool:
  return tf.as_dtype(dtype) in _HALF_DTYPES


def variable_dtype(input_dtype) -> tf.DType:
  """Variables of a layer fed `input_dtype`: float32 for 16-bit inputs."""
  return tf.float32 if is_half(input_dtype) else tf.as_dtype(input_dtype)


def to_compute(tensor: tf.Tensor, dtype: Optional[tf.DType]) -> tf.Tensor:
  """`tensor` cast to the compute dtype; unchanged when `dtype` is None."""
  tensor = tf.convert_to_tensor(tensor)
  return tensor if dtype is None else tf.cast(tensor, dtype)


def logits_to_float32(logits: tf.Tensor) -> tf.Tensor:
  """16-bit logits cast back to float32 for the loss; others unchanged."""
  return tf.cast(logits, tf.float32) if is_half(logits.dtype) else logits


def _cast_like(variable, inputs):
  """`variable` in the dtype of `inputs` (itself when they already agree)."""
  if variable.dtype == inputs.dtype:
    return variable
  return tf.cast(variable, inputs.dtype)


def _as_variable_dtype(inputs):
  return tf.cast(inputs, variable_dtype(inputs.dtype))


class Linear(snt.Linear):
  """`snt.Linear` computing in its input's dtype over float32 variables."""

  @snt.once
  def _initialize(self, inputs: tf.Tensor):
    super()._initialize(_as_variable_dtype(inputs))

  def __call__(self, inputs: tf.Tensor) -> tf.Tensor:
    self._initialize(inputs)
    outputs = tf.matmul(inputs, _cast_like(self.w, inputs))
    if self.with_bias:
      outputs = tf.add(outputs, _cast_like(self.b, inputs))
    return outputs


class Conv2D(snt.Conv2D):
  """`snt.Conv2D` computing in its input's dtype over float32 variables."""

  @snt.once
  def _initialize(self, inputs: tf.Tensor):
    super()._initialize(_as_variable_dtype(inputs))

  def __call__(self, inputs: tf.Tensor) -> tf.Tensor:
    self._initialize(inputs)
    if self.padding_func:
      inputs = tf.pad(inputs, self._padding)
    outputs = tf.nn.convolution(
        inputs, _cast_like(self.w, inputs), strides=self.stride,
        padding=self.conv_padding, dilations=self.rate,
        data_format=self.data_format)
    if self.with_bias:
      outputs = tf.nn.bias_add(outputs, _cast_like(self.b, inputs),
                               data_format=self.data_format)
    return outputs


class BatchNorm(snt.BatchNorm):
  """`snt.BatchNorm` with float32 parameters and statistics for 16-bit inputs.

  The fused kernel (NHWC) normalises 16-bit inputs directly; otherwise the
  input is normalised in float32 and the output cast back to its dtype.
  """

  @snt.once
  def _initialize(self, inputs: tf.Tensor):
    super()._initialize(_as_variable_dtype(inputs))

  def __call__(self, inputs: tf.Tensor, is_training, test_local_stats=False,
               scale=None, offset=None):
    inputs = tf.convert_to_tensor(inputs)
    self._initialize(inputs)
    if not is_half(inputs.dtype) or self._fused:
      return super().__call__(inputs, is_training, test_local_stats, scale,
                              offset)
    outputs = super().__call__(tf.cast(inputs, tf.float32), is_training,
                               test_local_stats, scale, offset)
    return tf.cast(outputs, inputs.dtype)


# ---------------------------------------------------------- Loss scaling.


def all_finite(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
  """A scalar bool: every element of every tensor is finite."""
  return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t))
                        for t in tensors])


def next_loss_scale(scale, finite_steps, finite, growth_interval,
                    minimum_scale):
  """One step of dynamic loss scaling (pure; Micikevicius et al., 2018).

  After `growth_interval` finite steps in a row the scale doubles; a
  non-finite step halves it (not below `minimum_scale`) and restarts the
  count. Returns `(scale, finite_steps)`.
  """
  grown = finite_steps + 1 >= growth_interval
  new_scale = tf.where(finite, tf.where(grown, scale * 2.0, scale),
                       tf.maximum(scale / 2.0, minimum_scale))
  new_finite_steps = tf.where(finite & ~grown, finite_steps + 1,
                              tf.zeros_like(finite_steps))
  return new_scale, new_finite_steps


class DynamicLossScale(snt.Module):
  """The loss scale S of float16 training, in checkpointed variables.

  The loss is multiplied by S before the backward pass and the gradients
  divided by S in float32 afterwards (`scale_loss`, `unscale`), so small
  float16 gradients do not underflow. `update(finite)` moves S
  (`next_loss_scale`) and counts the skipped updates.

  Variables (create inside `strategy.scope()`): `scale` (float32),
  `finite_steps` (finite updates since S last changed) and
  `skipped_updates` (updates skipped since the run started), both int64.
  """

  def __init__(self, initial_scale: float = 2.0**15,
               growth_interval: int = 2000, minimum_scale: float = 1.0,
               name: str = "loss_scale"):
    super().__init__(name=name)
    if not initial_scale >= minimum_scale > 0:
      raise ValueError(f"initial_scale must be >= minimum_scale > 0; got "
                       f"{initial_scale} and {minimum_scale}")
    if growth_interval < 1:
      raise ValueError(f"growth_interval must be >= 1; got {growth_interval}")
    self.growth_interval = growth_interval
    self.minimum_scale = minimum_scale
    first_replica = tf.VariableAggregation.ONLY_FIRST_REPLICA
    with self.name_scope:
      self.scale = tf.Variable(float(initial_scale), trainable=False,
                               name="scale", aggregation=first_replica)
      self.finite_steps = tf.Variable(tf.constant(0, tf.int64),
                                      trainable=False, name="finite_steps",
                                      aggregation=first_replica)
      self.skipped_updates = tf.Variable(tf.constant(0, tf.int64),
                                         trainable=False,
                                         name="skipped_updates",
                                         aggregation=first_replica)

  def scale_loss(self, loss: tf.Tensor) -> tf.Tensor:
    return loss * tf.cast(self.scale, loss.dtype)

  def unscale(self, gradients: Sequence[tf.Tensor]):
    """Scaled gradients divided by S, in their own (float32) dtype."""
    return [g / tf.cast(self.scale, g.dtype) for g in gradients]

  def update(self, finite: tf.Tensor):
    """Moves S after an update; counts it as skipped unless `finite`.

    Call in cross-replica context, once per gradient evaluation.
    """
    scale, finite_steps = next_loss_scale(
        self.scale.read_value(), self.finite_steps.read_value(), finite,
        self.growth_interval, self.minimum_scale)
    self.scale.assign(scale)
    self.finite_steps.assign(finite_steps)
    self.skipped_updates.assign_add(tf.cast(~finite, tf.int64))

  @property
  def at_minimum(self) -> bool:
    """Whether S is at its floor (eager): overflows are then genuine."""
    return float(self.scale.numpy()) <= self.minimum_scale
