"""The SGLD step of Entropy-SGD on TensorFlow tensors: fused or unfused.

`langevin_update` draws the noise of SGLD step (t, l) and applies
`algorithm.langevin_update` (one SGLD step and one running-mean step per
parameter). Written as TensorFlow ops, that is many passes over memory: the
noise is written and read back, and every term of the update reads and
writes full tensors. On small, wide models those passes cost more than the
gradient. So where the compiled CPU kernel applies (`noise.resolve`: it
loads, no GPU, no TPU, no XLA) and every tensor is float32, one kernel op
(`LangevinFusedStep` in `noise_kernel.cc`) does the whole step in one pass:
it reads x', x, mu, g (and v) once, writes x', mu (and v) once, and draws
the noise in registers.

The fused op computes the unfused graph's operations in its order, each
rounded on its own, on the noise the kernel's `LangevinStandardNormal`
draws; `langevin_test` checks the two equal bit for bit for every
convention (so runs do not change when it is switched on or off). Other
dtypes (float64, bfloat16 or float16 variables) and XLA use the unfused
math.

The Sonnet optimizer (`optimizers.EntropySGD`) and the Keras optimizer
(`keras_plugin.EntropySGD`) both call `langevin_update`.
"""

from typing import Optional, Sequence

import tensorflow as tf

from entropy_sgd.core import algorithm
from entropy_sgd.core import noise as noise_lib


def as_dtype(value, dtype) -> tf.Tensor:
  """`value` as a tensor of `dtype`.

  A Python number becomes a constant of `dtype` directly: `tf.cast(0.1,
  tf.float64)` would first make it a float32 tensor (0.10000000149...). A
  tensor or `tf.Variable` is cast, so a float32 learning-rate variable keeps
  float32 precision; give float64 models a float64 variable.
  """
  if isinstance(value, (int, float)):
    return tf.constant(value, dtype)
  return tf.cast(value, dtype)


# TensorFlow's operations for `algorithm.py`.
TF_OPS = algorithm.Ops(sqrt=tf.sqrt, exp=tf.exp, sum=tf.reduce_sum,
                       cast=lambda value, like: as_dtype(value, like.dtype))


@tf.autograph.experimental.do_not_convert  # Plain Python.
def fused_op():
  """The kernel library's fused op, or None (not loaded, or a library built
  before the op existed)."""
  kernel = noise_lib.load_kernel().kernel
  return getattr(kernel, "langevin_fused_step", None)


@tf.autograph.experimental.do_not_convert  # Plain Python.
def fuses(samples: Sequence[tf.Tensor], use_kernel: Optional[bool] = None,
          fused: Optional[bool] = None) -> bool:
  """Whether `langevin_update` takes the fused op for these tensors.

  `use_kernel` as in `noise.standard_normal` (None: where the kernel
  applies). `fused`: None fuses whenever the kernel is used and every tensor
  is float32; False never; True requires it (an error if it cannot).
  """
  float32 = all(x.dtype == tf.float32 for x in samples)
  if fused is False or use_kernel is False:
    if fused:
      raise ValueError("fused=True needs the noise kernel (use_kernel)")
    return False
  kernel_used = (use_kernel if use_kernel is not None else
                 noise_lib.kernel_applies(tf.float32))
  can = kernel_used and float32 and fused_op() is not None
  if fused and not can:
    raise noise_lib.KernelUnavailableError(
        "the fused SGLD step cannot run here: it needs float32 tensors and "
        f"the compiled kernel, which is {noise_lib.kernel_status()}")
  return can


def langevin_update(hp: algorithm.Hyperparameters, samples, anchors, means,
                    gradients, velocities, *, step, inner_step, stream=0,
                    langevin_learning_rate, use_kernel: Optional[bool] = None,
                    fused: Optional[bool] = None):
  """SGLD step l = `inner_step` of outer step t = `step` of chain `stream`,
  with its keyed noise, for every parameter (see
  `algorithm.langevin_update`). `use_kernel`, `fused`: see `fuses`.
  Returns `(samples, means, velocities)`."""
  if not fuses(samples, use_kernel, fused):
    standard_normals = None
    if hp.draws_noise:
      standard_normals = noise_lib.langevin_noise(
          hp.seed, step, inner_step, [x.shape for x in samples],
          samples[0].dtype, stream, use_kernel)
    return algorithm.langevin_update(
        hp, samples, anchors, means, gradients, velocities, standard_normals,
        step=step, langevin_learning_rate=langevin_learning_rate,
        ops=TF_OPS)

  c = hp.conventions
  like = samples[0]
  learning_rate = TF_OPS.cast(langevin_learning_rate, like)
  noise_std = algorithm.langevin_noise_std(
      learning_rate, TF_OPS.cast(hp.noise, like), c.noise_scale, tf.sqrt)
  constants = tf.stack([
      algorithm.gamma_at(hp, step, like, TF_OPS), learning_rate, noise_std,
      noise_std / learning_rate, TF_OPS.cast(hp.weight_decay, like),
      TF_OPS.cast(c.inner_momentum, like),
      TF_OPS.cast(hp.new_sample_weight, like)])
  if hp.draws_noise:
    total = sum(x.shape.num_elements() for x in samples)
    keys, counters = noise_lib.chunk_keys_and_counters(
        noise_lib.step_key(hp.seed, step, inner_step, stream),
        2 * ((total + 1) // 2))
  else:
    keys = counters = tf.zeros([0], tf.uint64)
  new_samples, new_means, new_velocities = fused_op()(
      samples=list(samples), anchors=list(anchors), means=list(means),
      gradients=[tf.convert_to_tensor(g) for g in gradients],
      velocities=list(velocities), constants=constants, keys=keys,
      counters=counters, nesterov=c.inner_nesterov,
      decay_before_momentum=c.inner_weight_decay == "before_momentum",
      buffer_takes_direction=c.inner_momentum_buffer == "direction",
      noise=hp.draws_noise)
  return list(new_samples), list(new_means), list(new_velocities)
