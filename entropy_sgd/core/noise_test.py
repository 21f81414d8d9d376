"""The Langevin noise: exactly N(0, I) in distribution, and reproducible."""

import io
import math
import os
from unittest import mock

from absl.testing import absltest
import numpy as np
import tensorflow as tf
from tensorflow.python.ops import gen_stateless_random_ops_v2

from entropy_sgd.core import build_noise_kernel
from entropy_sgd.core import noise


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


def skip_unless_kernel(test):
  """Skips without the compiled kernel, unless Bazel said it was built."""
  if noise.kernel_status().startswith("loaded"):
    return
  if (noise.kernel_build_status() == "built" and
      not noise.kernel_status().startswith("off")):
    test.fail(f"The kernel was built but is {noise.kernel_status()}")
  test.skipTest(f"noise kernel {noise.kernel_status()}")


class StandardNormalTest(absltest.TestCase):
  """Distribution of TensorFlow ops' draw (`use_kernel=False`)."""

  use_kernel = False

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.sample = None

  def setUp(self):
    super().setUp()
    if self.use_kernel:
      skip_unless_kernel(self)
    if type(self).sample is None:
      type(self).sample = noise.standard_normal(
          noise.step_key(7, 3, 1), 2_000_001,
          use_kernel=self.use_kernel).numpy().astype(np.float64)
      self.sample = type(self).sample

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


class KernelStandardNormalTest(StandardNormalTest):
  """The same checks of the compiled CPU kernel's draw."""

  use_kernel = True


class KernelAgreementTest(absltest.TestCase):
  """The kernel against TensorFlow's Philox and a float64 NumPy reference."""

  def setUp(self):
    super().setUp()
    skip_unless_kernel(self)

  def test_philox_words_are_tensorflows_bit_for_bit(self):
    # Sizes across block (4 words) and chunk (2^18 words) boundaries.
    for num_words in (1, 3, 4, 5, 1000, noise.BITS_PER_CHUNK + 5,
                      3 * noise.BITS_PER_CHUNK):
      key = noise.step_key(2, 9, 4)
      np.testing.assert_array_equal(
          noise.philox_words(key, num_words).numpy(),
          noise.random_bits(key, num_words).numpy(), f"{num_words} words")

  def test_philox_words_carry_the_counter_as_tensorflow_does(self):
    # The vector loop takes blocks in groups of up to 32; here the 64-bit
    # counter word wraps inside a group, and the high word wraps too.
    kernel = noise.load_kernel().kernel
    key = tf.constant([0x0123456789ABCDEF], tf.uint64)
    for counter_lo, counter_hi in ((2**64 - 37, 5), (2**64 - 1, 2**64 - 1),
                                   (2**63 - 64, 0)):
      counter = tf.constant([counter_lo, counter_hi], tf.uint64)
      num_words = 4 * 100 + 3
      expected = gen_stateless_random_ops_v2.stateless_random_uniform_full_int_v2(
          shape=[num_words], key=key, counter=counter, alg=1,  # Philox
          dtype=tf.uint32)
      np.testing.assert_array_equal(
          kernel.langevin_philox_words(key, counter, num_words=num_words),
          expected, f"counter ({counter_lo}, {counter_hi})")

  def test_normals_match_float64_box_muller(self):
    for num_values in (1, 2, 7, noise.BITS_PER_CHUNK + 3):
      key = noise.step_key(11, 0, 5)
      num_pairs = (num_values + 1) // 2
      bits = noise.random_bits(key, 2 * num_pairs).numpy().astype(np.float64)
      radius = np.sqrt(-2 * np.log((bits[:num_pairs] + 0.5) / 2**32))
      angle = 2 * np.pi * np.floor(bits[num_pairs:] / 2**8) / 2**24
      expected = np.concatenate([radius * np.cos(angle),
                                 radius * np.sin(angle)])[:num_values]
      actual = noise.standard_normal(key, num_values, use_kernel=True).numpy()
      # float32 rounding of the angle (about 4e-7 rad) times radii up to
      # about 5, and of the radius itself.
      np.testing.assert_allclose(actual, expected, rtol=4e-7, atol=3e-6)

  def test_default_uses_the_kernel_on_this_cpu(self):
    key = noise.step_key(1, 2, 3)
    np.testing.assert_array_equal(
        noise.standard_normal(key, 1001).numpy(),
        noise.standard_normal(key, 1001, use_kernel=True).numpy())

  def test_float64_and_xla_use_tensorflow_ops(self):
    key = noise.step_key(1, 2, 3)
    np.testing.assert_array_equal(
        noise.standard_normal(key, 101, tf.float64).numpy(),
        noise.standard_normal(key, 101, tf.float64, use_kernel=False).numpy())
    # The default picks TensorFlow's ops inside XLA (the kernel has none).
    jitted = tf.function(lambda k: noise.standard_normal(k, 101),
                         jit_compile=True)
    np.testing.assert_allclose(
        jitted(key).numpy(),
        noise.standard_normal(key, 101, use_kernel=False).numpy(),
        atol=1e-6)


def op_types(use_kernel):
  """The op types of a traced float32 draw."""
  draw = tf.function(lambda key: noise.standard_normal(
      key, 1001, use_kernel=use_kernel))
  graph = draw.get_concrete_function(
      tf.TensorSpec([2], tf.int64)).graph
  return {op.type for op in graph.get_operations()}


class ResolveTest(absltest.TestCase):
  """Which implementation each --noise_kernel choice resolves to, and why."""

  def setUp(self):
    super().setUp()
    environment = mock.patch.dict(os.environ)
    environment.start()
    self.addCleanup(environment.stop)
    os.environ.pop(noise.PATH_VARIABLE, None)

  def test_off_draws_with_tensorflow_ops(self):
    implementation = noise.resolve("off")
    self.assertEqual(implementation.name, noise.TENSORFLOW)
    self.assertFalse(implementation.use_kernel)
    types = op_types(implementation.use_kernel)
    self.assertNotIn("LangevinStandardNormal", types)
    self.assertTrue(any(t.startswith("StatelessRandomUniform")
                        for t in types), types)
    key = noise.step_key(4, 1, 2)
    np.testing.assert_array_equal(
        noise.standard_normal(key, 1001,
                              use_kernel=implementation.use_kernel).numpy(),
        noise.box_muller(noise.random_bits(key, 1002)).numpy()[:1001])

  def test_on_draws_with_the_kernel_where_it_loads(self):
    skip_unless_kernel(self)
    implementation = noise.resolve("on")
    self.assertEqual(implementation.name, noise.KERNEL)
    self.assertEqual(implementation.reason,
                     f"on: loaded {noise.packaged_kernel_path()}")
    self.assertEqual(noise.resolve("auto").name, noise.KERNEL)  # A CPU.
    self.assertIn("LangevinStandardNormal", op_types(True))

  def test_on_without_a_loadable_kernel_is_one_line(self):
    missing = os.path.join(self.create_tempdir().full_path, "none.so")
    garbage = self.create_tempfile("garbage.so", content="not a library")
    for path, status in ((missing, "missing: "),
                         (garbage.full_path, "not loadable: ")):
      os.environ[noise.PATH_VARIABLE] = path
      with self.assertRaises(noise.KernelUnavailableError) as caught:
        noise.resolve("on")
      message = str(caught.exception)
      self.assertNotIn("\n", message)
      self.assertIn(f"the compiled noise kernel is {status}", message)
      self.assertIn(path, message)
      self.assertIn(f"unset {noise.PATH_VARIABLE}", message)
      auto = noise.resolve("auto")  # Falls back, and says why.
      self.assertEqual(auto.name, noise.TENSORFLOW)
      self.assertIn(path, auto.reason)
      self.assertIn("the same distribution", auto.reason)
    os.environ[noise.PATH_VARIABLE] = "off"
    with self.assertRaisesRegex(noise.KernelUnavailableError,
                                "is off \\(ENTROPY_SGD_NOISE_KERNEL=off\\)"):
      noise.resolve("on")
    self.assertEqual(noise.resolve("off").name, noise.TENSORFLOW)

  def test_a_library_built_for_another_cpu_is_refused(self):
    # A copy (venv, Bazel cache) of a library built for extensions this CPU
    # lacks: refused before loading, with the fix, instead of crashing.
    library = self.create_tempfile("k.so", content="not loaded").full_path
    with open(library + build_noise_kernel.CPU_SUFFIX, "w") as f:
      f.write("avx2 avx512f made_up_extension\n")
    self.assertEqual(
        build_noise_kernel.missing_cpu_flags(library, {"avx2", "sse2"}),
        ["avx512f", "made_up_extension"])
    self.assertEqual(
        build_noise_kernel.missing_cpu_flags(library, {"avx2", "avx512f",
                                                       "made_up_extension"}),
        [])
    os.environ[noise.PATH_VARIABLE] = library
    with self.assertRaises(noise.KernelUnavailableError) as caught:
      noise.resolve("on")
    message = str(caught.exception)
    self.assertNotIn("\n", message)
    self.assertIn("made_up_extension, which this CPU lacks", message)
    self.assertIn("rebuild that library on this machine", message)
    self.assertEqual(noise.resolve("auto").name, noise.TENSORFLOW)

  def test_the_build_records_its_cpu(self):
    skip_unless_kernel(self)
    self.assertEqual(
        build_noise_kernel.missing_cpu_flags(noise.kernel_path()), [])
    with open(noise.kernel_path() + build_noise_kernel.CPU_SUFFIX) as f:
      recorded = f.read().split()
    self.assertEqual(recorded, build_noise_kernel.isa_flags(recorded))
    if "avx2" in open("/proc/cpuinfo").read():
      self.assertIn("avx2", recorded)

  def test_xla_cannot_run_the_kernel(self):
    with self.assertRaisesRegex(noise.KernelUnavailableError, "XLA"):
      noise.resolve("on", jit_compile=True)
    auto = noise.resolve("auto", jit_compile=True)
    self.assertEqual((auto.name, auto.reason), (
        noise.TENSORFLOW, "auto: the step is compiled with XLA, which "
        "cannot run it"))

  def test_unknown_choice(self):
    with self.assertRaisesRegex(ValueError, "'yes' is not one of"):
      noise.resolve("yes")

  def test_the_library_is_the_packaged_one_unless_overridden(self):
    here = os.path.dirname(os.path.abspath(noise.__file__))
    self.assertEqual(noise.packaged_kernel_path(),
                     os.path.join(here, "noise_kernel.so"))
    self.assertEqual(noise.kernel_path(), noise.packaged_kernel_path())
    os.environ[noise.PATH_VARIABLE] = "/some/where/k.so"
    self.assertEqual(noise.kernel_path(), "/some/where/k.so")
    if "TEST_SRCDIR" in os.environ:  # Under Bazel: its build is packaged.
      self.assertIsNotNone(noise.kernel_build_status(),
                           f"no {noise.BUILD_STATUS_FILE} beside {here}")


class BuildCommandTest(absltest.TestCase):
  """`python -m entropy_sgd.core.build_noise_kernel`, short of compiling."""

  def test_compiles_the_packaged_source_with_tensorflows_flags(self):
    self.assertEqual(os.path.dirname(build_noise_kernel.SOURCE),
                     os.path.dirname(os.path.abspath(noise.__file__)))
    self.assertTrue(os.path.exists(build_noise_kernel.SOURCE))
    self.assertEqual(build_noise_kernel.OUTPUT, noise.packaged_kernel_path())
    flags = tf.sysconfig.get_compile_flags() + tf.sysconfig.get_link_flags()
    command = build_noise_kernel.compile_command(
        "g++", build_noise_kernel.SOURCE, "/tmp/k.so",
        build_noise_kernel.tensorflow_flags())
    self.assertEqual(command[0], "g++")
    self.assertContainsSubset(["-shared", "-fPIC", "-march=native",
                               build_noise_kernel.SOURCE, "/tmp/k.so"],
                              command)
    self.assertEqual(command[-len(flags):], flags)

  def test_without_gxx_it_says_so_in_one_line(self):
    output = os.path.join(self.create_tempdir().full_path, "k.so")
    with mock.patch.object(build_noise_kernel.shutil, "which",
                           return_value=None), \
        mock.patch("sys.stderr", new_callable=io.StringIO) as stderr:
      self.assertEqual(build_noise_kernel.main([f"--output={output}"]), 1)
    self.assertEqual(stderr.getvalue().splitlines(), [
        "error: noise kernel not built: no g++ on PATH; install it (e.g. "
        "apt-get install g++)"])
    self.assertFalse(os.path.exists(output))


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
