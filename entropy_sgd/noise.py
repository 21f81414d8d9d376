"""The Langevin noise: reproducible standard normal draws, fast on CPUs.

Each SGLD step of Entropy-SGD adds eps * sqrt(eta') * N(0, I) to every
parameter. On small, wide models that draw costs more than the gradient:
TensorFlow's `stateless_normal` takes about 9 ms for mnistfc's 1.86M
parameters on a 2-core CPU, its `stateless_uniform` bits only about 3 ms. So
`standard_normal` draws uniform Philox bits, one 32-bit word per output, and
maps pairs of them to pairs of independent normals with the Box-Muller
transform (Box & Muller, 1958):

    u1 = (b1 + 1/2) / 2^32 in (0, 1],  u2 = (b2 >> 8) / 2^24 in [0, 1)
    z1 = sqrt(-2 log u1) cos(2 pi u2),  z2 = sqrt(-2 log u1) sin(2 pi u2)

For exactly uniform u1, u2 the transform gives exactly independent N(0, 1)
pairs; here u1 lives on a grid of 2^32 points (so |z| <= 6.77, cutting off a
probability of 1.3e-11) and the angle on a grid of 2^24 points, finer than
float32 resolves. `noise_test` checks moments and a Kolmogorov-Smirnov test
on a large draw.

On CPUs an optional compiled kernel (`noise_kernel.cc`, built by Bazel with
the host's g++, see `third_party/noise_kernel`) draws the same Philox words,
bit for bit, and applies the same Box-Muller map in vectorised loops, about
4x faster. Its log, cos and sin are its own polynomials, so its normals
agree with the TensorFlow ops' to float32 rounding (|difference| < 2e-6),
not bit for bit. It is used for float32 draws when it is built and loaded,
no GPU is visible, the strategy is not a TPU strategy and the caller does not
compile with XLA (inside an XLA-compiled function the TensorFlow ops are
used); `kernel_status()` says whether it is loaded and why not;
ENTROPY_SGD_NOISE_KERNEL=off disables it and =PATH loads that library.

Keys: the noise of one SGLD step is keyed by (seed, stream, outer step t,
inner step l) and drawn in one piece for all parameters; parameter i gets
the slice at its offset in the concatenation of all parameters, in the
optimizer's order. So runs are reproducible, a resumed run draws the same
noise, and every replica draws the same noise without communication
(`stream` separates Parle's chains).
"""

import math
import os
from typing import List, Optional, Sequence

import numpy as np
import tensorflow as tf
from tensorflow.python.ops import control_flow_util
from tensorflow.python.ops import gen_stateless_random_ops_v2

_TWO_PI = 2.0 * math.pi


def step_key(seed, step, inner_step, stream=0) -> tf.Tensor:
  """The Philox key [2] of the noise of SGLD step (t, l) of chain `stream`."""
  key = tf.stack([tf.constant(seed, tf.int64), tf.cast(stream, tf.int64)])
  for data in (step, inner_step):
    key = tf.random.experimental.stateless_fold_in(
        key, tf.cast(data, tf.int64), alg="philox")
  return key


def box_muller(bits: tf.Tensor, dtype=tf.float32) -> tf.Tensor:
  """Independent N(0, 1) values, one per uint32 in `bits` (even length).

  The first half of `bits` gives the radii and the second half the angles;
  the output holds the cosine parts, then the sine parts.
  """
  compute_dtype = tf.float64 if dtype == tf.float64 else tf.float32
  radius_bits, angle_bits = tf.split(bits, 2)
  u1 = (tf.cast(radius_bits, compute_dtype) + 0.5) * 2.0**-32
  u2 = tf.cast(tf.bitwise.right_shift(angle_bits, tf.constant(8, tf.uint32)),
               compute_dtype) * 2.0**-24
  radius = tf.sqrt(-2.0 * tf.math.log(tf.minimum(u1, 1.0)))
  angle = _TWO_PI * u2
  normals = tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], 0)
  return tf.cast(normals, dtype)


# Bits are drawn in chunks of this many words, chunk c keyed by
# fold_in(key, c): TensorFlow's Philox kernel runs on one thread, and
# independent chunks run on all cores at once. Fixed, so the values do not
# depend on the machine.
BITS_PER_CHUNK = 1 << 18


def random_bits(key: tf.Tensor, num_words: int) -> tf.Tensor:
  """`num_words` uniform uint32 words keyed by the Philox `key`."""
  chunks = []
  for index, start in enumerate(range(0, num_words, BITS_PER_CHUNK)):
    chunk_key = tf.random.experimental.stateless_fold_in(key, index,
                                                         alg="philox")
    chunks.append(tf.random.stateless_uniform(
        [min(BITS_PER_CHUNK, num_words - start)], seed=chunk_key,
        minval=None, maxval=None, dtype=tf.uint32, alg="philox"))
  return chunks[0] if len(chunks) == 1 else tf.concat(chunks, 0)


def _chunk_keys_and_counters(key: tf.Tensor, num_words: int):
  """Philox (key, counter) of every chunk, as `random_bits` derives them."""
  keys, counters = [], []
  for index in range(-(-num_words // BITS_PER_CHUNK)):
    chunk_key = tf.random.experimental.stateless_fold_in(key, index,
                                                         alg="philox")
    philox_key, counter = (
        gen_stateless_random_ops_v2.stateless_random_get_key_counter(
            chunk_key))
    keys.append(philox_key)
    counters.append(counter)
  return tf.concat(keys, 0), tf.stack(counters)


_KERNEL_NAME = "noise_kernel.so"
_kernel = None
_kernel_status = None


def _kernel_directories() -> List[str]:
  """Where Bazel puts the kernel: runfiles of a target, or the source tree."""
  here = os.path.dirname(os.path.abspath(__file__))
  return [
      os.path.join(here, "..", "external", "noise_kernel"),
      os.path.join(here, "..", "..", "noise_kernel"),
      os.path.join(here, "..", "bazel-" + os.path.basename(
          os.path.dirname(here)), "external", "noise_kernel"),
  ]


@tf.autograph.experimental.do_not_convert  # Plain Python.
def kernel_build_status() -> Optional[str]:
  """What the Bazel build of the kernel said ("built", "not built: ..."),
  or None outside Bazel's runfiles and source tree."""
  for directory in _kernel_directories():
    path = os.path.join(directory, "status.txt")
    if os.path.exists(path):
      with open(path) as status:
        return status.read().strip()
  return None


@tf.autograph.experimental.do_not_convert  # Plain Python.
def _load_kernel():
  """Loads the kernel once; returns the op module or None."""
  global _kernel, _kernel_status
  if _kernel_status is not None:
    return _kernel
  setting = os.environ.get("ENTROPY_SGD_NOISE_KERNEL", "")
  if setting == "off":
    _kernel_status = "off (ENTROPY_SGD_NOISE_KERNEL=off)"
    return None
  candidates = [setting] if setting else [
      os.path.join(directory, _KERNEL_NAME)
      for directory in _kernel_directories()]
  for path in candidates:
    if os.path.exists(path):
      try:
        _kernel = tf.load_op_library(path)
        _kernel_status = f"loaded {os.path.normpath(path)}"
      except (tf.errors.NotFoundError, OSError) as error:
        _kernel_status = f"{path} did not load: {error}"
      return _kernel
  _kernel_status = (kernel_build_status() or
                    "not built (run through Bazel, which compiles it with "
                    "g++; see third_party/noise_kernel)")
  return None


def kernel_status() -> str:
  """Whether the compiled noise kernel is loaded, and if not, why."""
  _load_kernel()
  return _kernel_status


@tf.autograph.experimental.do_not_convert  # Plain Python.
def _in_xla_function() -> bool:
  return control_flow_util.GraphOrParentsInXlaContext(
      tf.compat.v1.get_default_graph())


@tf.autograph.experimental.do_not_convert  # Plain Python.
def _kernel_applies(dtype) -> bool:
  if dtype != tf.float32 or _load_kernel() is None or _in_xla_function():
    return False
  if tf.config.list_logical_devices("GPU"):
    return False
  strategy = tf.distribute.get_strategy()
  tpu_strategies = tuple(
      getattr(module, "TPUStrategy") for module in
      (tf.distribute, tf.distribute.experimental)
      if hasattr(module, "TPUStrategy"))
  return not isinstance(strategy, tpu_strategies)


def standard_normal(key: tf.Tensor, num_values: int, dtype=tf.float32,
                    use_kernel: Optional[bool] = None) -> tf.Tensor:
  """`num_values` independent N(0, 1) values keyed by the Philox `key`.

  `use_kernel`: None uses the compiled CPU kernel where it applies (see the
  module docstring), False never (e.g. inside an XLA-compiled function),
  True always (an error if it is not loaded).
  """
  num_pairs = (num_values + 1) // 2
  if use_kernel is None:
    use_kernel = _kernel_applies(dtype)
  if use_kernel:
    kernel = _load_kernel()  # Not the global: AutoGraph copies globals.
    if kernel is None:
      raise RuntimeError(f"The noise kernel is {kernel_status()}.")
    keys, counters = _chunk_keys_and_counters(key, 2 * num_pairs)
    normals = kernel.langevin_standard_normal(keys, counters,
                                              num_values=num_values)
    return tf.cast(normals, dtype)
  return box_muller(random_bits(key, 2 * num_pairs), dtype)[:num_values]


def philox_words(key: tf.Tensor, num_words: int) -> tf.Tensor:
  """The kernel's Philox words; equal to `random_bits(key, num_words)`."""
  kernel = _load_kernel()
  if kernel is None:
    raise RuntimeError(f"The noise kernel is {kernel_status()}.")
  keys, counters = _chunk_keys_and_counters(key, num_words)
  return kernel.langevin_philox_words(keys, counters, num_words=num_words)


def langevin_noise(seed, step, inner_step, shapes: Sequence[tf.TensorShape],
                   dtype=tf.float32, stream=0,
                   use_kernel: Optional[bool] = None) -> List[tf.Tensor]:
  """N(0, I) noise of SGLD step (t, l), one tensor per shape in `shapes`."""
  sizes = [int(np.prod(shape)) for shape in shapes]
  flat = standard_normal(step_key(seed, step, inner_step, stream),
                         sum(sizes), dtype, use_kernel)
  return [tf.reshape(part, shape)
          for part, shape in zip(tf.split(flat, sizes), shapes)]
