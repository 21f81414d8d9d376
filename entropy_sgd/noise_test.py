"""The Langevin noise: exactly N(0, I) in distribution, and reproducible."""

import math

from absl.testing import absltest
import numpy as np
import tensorflow as tf

from entropy_sgd import noise


def normal_cdf(z):
  return 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


def kolmogorov_smirnov_p_value(sample):
  """Two-sided KS test of `sample` against N(0, 1) (asymptotic p-value)."""
  sample = np.sort(sample)
  n = len(sample)
  cdf = normal_cdf(sample)
  statistic = max(np.max(np.arange(1, n + 1) / n - cdf),
                  np.max(cdf - np.arange(n) / n))
  # Kolmogorov's distribution, with Stephens' small-sample correction.
  lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * statistic
  return float(max(0.0, min(1.0, 2.0 * sum(
      (-1)**(k - 1) * math.exp(-2.0 * k * k * lam * lam)
      for k in range(1, 101)))))


class BoxMullerTest(absltest.TestCase):

  def test_extreme_bits_stay_finite(self):
    bits = tf.constant([0, 2**32 - 1, 0, 2**32 - 1], tf.uint32)
    values = noise.box_muller(bits).numpy()
    self.assertTrue(np.all(np.isfinite(values)))
    # u1 = 2^-33 gives the largest radius, sqrt(-2 log 2^-33) = 6.77.
    self.assertAlmostEqual(float(np.max(np.abs(values))),
                           math.sqrt(66 * math.log(2)), places=4)

  def test_known_pair(self):
    # b1 = 2^31 - 1/2 -> u1 = 1/2 exactly; b2 = 2^30 -> angle pi/2.
    bits = tf.constant([2**31, 2**30 * 1], tf.uint32)
    cos_part, sin_part = noise.box_muller(bits, tf.float64).numpy()
    radius = math.sqrt(-2 * math.log((2**31 + 0.5) / 2**32))
    self.assertAlmostEqual(cos_part, radius * math.cos(math.pi / 2), 12)
    self.assertAlmostEqual(sin_part, radius * math.sin(math.pi / 2), 12)


class StandardNormalTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.sample = noise.standard_normal(
        noise.step_key(7, 3, 1), 2_000_001).numpy().astype(np.float64)

  def test_length_and_dtype(self):
    self.assertEqual(self.sample.shape, (2_000_001,))
    draw = noise.standard_normal(noise.step_key(1, 0, 0), 5, tf.float64)
    self.assertEqual(draw.dtype, tf.float64)

  def test_moments(self):
    n = len(self.sample)
    # Standard errors of the first four sample moments of N(0, 1).
    for order, expected, variance in ((1, 0.0, 1.0), (2, 1.0, 2.0),
                                      (3, 0.0, 15.0), (4, 3.0, 96.0)):
      moment = float(np.mean(self.sample**order))
      self.assertLess(abs(moment - expected), 5 * math.sqrt(variance / n),
                      f"moment {order}: {moment}")

  def test_kolmogorov_smirnov(self):
    self.assertGreater(kolmogorov_smirnov_p_value(self.sample), 1e-3)
    # The test has power: a 1% scale error is rejected.
    self.assertLess(kolmogorov_smirnov_p_value(1.01 * self.sample), 1e-3)

  def test_tails(self):
    n = len(self.sample)
    for threshold in (2.0, 3.0, 4.0):
      expected = 2 * (1 - normal_cdf(np.array(threshold)))
      observed = np.mean(np.abs(self.sample) > threshold)
      self.assertLess(abs(observed - expected),
                      5 * math.sqrt(expected * (1 - expected) / n))

  def test_halves_are_independent(self):
    # The cosine and sine halves come from the same uniforms.
    half = len(self.sample) // 2
    cosines, sines = self.sample[:half], self.sample[half:2 * half]
    self.assertLess(abs(np.corrcoef(cosines, sines)[0, 1]), 5 / math.sqrt(
        half))
    self.assertLess(abs(np.corrcoef(cosines**2, sines**2)[0, 1]),
                    5 / math.sqrt(half))


class LangevinNoiseTest(absltest.TestCase):

  def draw(self, t, l, stream=0, seed=5):
    return [v.numpy() for v in noise.langevin_noise(
        seed, t, l, [tf.TensorShape([30, 40]), tf.TensorShape([7])],
        tf.float32, stream)]

  def test_shapes(self):
    first, second = self.draw(0, 0)
    self.assertEqual((first.shape, second.shape), ((30, 40), (7,)))

  def test_reproducible(self):
    for a, b in zip(self.draw(3, 2), self.draw(3, 2)):
      np.testing.assert_array_equal(a, b)

  def test_distinct_per_step_stream_and_seed(self):
    base = np.concatenate([v.ravel() for v in self.draw(3, 2)])
    for other in (self.draw(4, 2), self.draw(3, 3), self.draw(3, 2, 1),
                  self.draw(3, 2, seed=6)):
      other = np.concatenate([v.ravel() for v in other])
      self.assertLess(abs(np.corrcoef(base, other)[0, 1]), 0.15)

  def test_parameters_get_disjoint_slices(self):
    flat = noise.standard_normal(noise.step_key(5, 3, 2), 1207).numpy()
    first, second = self.draw(3, 2)
    np.testing.assert_array_equal(first.ravel(), flat[:1200])
    np.testing.assert_array_equal(second, flat[1200:])


if __name__ == "__main__":
  absltest.main()
