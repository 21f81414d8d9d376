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

Keys: the noise of one SGLD step is keyed by (seed, stream, outer step t,
inner step l) and drawn in one piece for all parameters; parameter i gets
the slice at its offset in the concatenation of all parameters, in the
optimizer's order. So runs are reproducible, a resumed run draws the same
noise, and every replica draws the same noise without communication
(`stream` separates Parle's chains).
"""

import math
from typing import List, Sequence

import numpy as np
import tensorflow as tf

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


def standard_normal(key: tf.Tensor, num_values: int,
                    dtype=tf.float32) -> tf.Tensor:
  """`num_values` independent N(0, 1) values keyed by the Philox `key`."""
  num_pairs = (num_values + 1) // 2
  return box_muller(random_bits(key, 2 * num_pairs), dtype)[:num_values]


def langevin_noise(seed, step, inner_step, shapes: Sequence[tf.TensorShape],
                   dtype=tf.float32, stream=0) -> List[tf.Tensor]:
  """N(0, I) noise of SGLD step (t, l), one tensor per shape in `shapes`."""
  sizes = [int(np.prod(shape)) for shape in shapes]
  flat = standard_normal(step_key(seed, step, inner_step, stream),
                         sum(sizes), dtype)
  return [tf.reshape(part, shape)
          for part, shape in zip(tf.split(flat, sizes), shapes)]
