"""The fused SGLD step equals the unfused math bit for bit, for every
convention, and draws the noise the kernel draws.

Op for op (eagerly) the two are bit-identical. Inside a `tf.function`,
Grappler's arithmetic optimizer rewrites the unfused graph (it regroups
sums), so there the two agree to float32 rounding: bit for bit with that
optimizer off; with it on, within 4 eps max|x| (eps = 2^-23) after two
outer steps of L = 3."""

import itertools

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from entropy_sgd.core import algorithm
from entropy_sgd.core import langevin
from entropy_sgd.core import noise
from entropy_sgd.core import optimizers

# Odd totals, tensors of one value, and boundaries that fall inside the
# tiles of 1,024 pairs; LARGE spans 3 chunks of 2^18 Philox words.
SHAPES = [(50, 61), (5,), (1,), (3, 3, 2, 4), (7, 1)]
LARGE = [(1000, 601), (5,), (1,), (3, 3, 2, 4), (7, 1)]

# Every state of the inner loop the conventions allow.
VARIANTS = [
    dict(inner_momentum=momentum, inner_nesterov=nesterov,
         inner_weight_decay=decay, inner_momentum_buffer=buffer)
    for momentum, nesterov, decay, buffer in itertools.product(
        (0.0, 0.9), (False, True), ("before_momentum", "after_momentum"),
        ("gradient", "direction"))
    if momentum > 0 or not nesterov
]


def skip_unless_fused(test):
  if langevin.fused_op() is None:
    if noise.kernel_build_status() == "built":
      test.fail(f"The kernel was built but has no fused op: "
                f"{noise.kernel_status()}")
    test.skipTest(f"noise kernel {noise.kernel_status()}")


def tensors(rng, shapes, dtype=np.float32):
  return [tf.constant(rng.normal(size=s).astype(dtype)) for s in shapes]


def update(hp, state, fused, **overrides):
  """One step, eagerly: op for op, with no graph rewrites."""
  samples, anchors, means, gradients, velocities = state
  arguments = dict(step=tf.constant(7, tf.int64),
                   inner_step=tf.constant(3, tf.int64), stream=0,
                   langevin_learning_rate=0.1, use_kernel=True, fused=fused)
  arguments.update(overrides)
  return langevin.langevin_update(hp, samples, anchors, means, gradients,
                                  velocities, **arguments)


class FusedStepTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    skip_unless_fused(self)

  @parameterized.parameters(
      [(v, n, d, SHAPES) for v, n, d in itertools.product(
          range(len(VARIANTS)), (0.0, 1e-3), (0.0, 5e-4))] +
      [(v, 1e-3, 5e-4, LARGE) for v in (0, len(VARIANTS) - 1)])
  def test_bit_identical_to_unfused(self, variant, noise_level, decay,
                                    shapes):
    conventions = algorithm.Conventions(
        alpha_weights="old_mean", noise_scale="sqrt_2lr",
        **VARIANTS[variant])
    hp = algorithm.Hyperparameters(noise=noise_level, weight_decay=decay,
                                   conventions=conventions, seed=11)
    rng = np.random.default_rng(variant)
    state = [tensors(rng, shapes) for _ in range(4)]
    state.append(tensors(rng, shapes) if conventions.inner_momentum else [])
    unfused = update(hp, state, fused=False)
    fused = update(hp, state, fused=True)
    for name, expected, actual in zip(("samples", "means", "velocities"),
                                      unfused, fused):
      self.assertLen(actual, len(expected))
      for i, (x, y) in enumerate(zip(expected, actual)):
        np.testing.assert_array_equal(x.numpy(), y.numpy(),
                                      err_msg=f"{name}[{i}]")

  def test_noise_is_the_kernels(self):
    # At x' = x = 0, g = 0 and no momentum, x' moves by noise_std * z only.
    hp = algorithm.Hyperparameters(noise=1e-2, seed=5)
    zeros = [tf.zeros(s) for s in LARGE]
    samples, _, _ = update(hp, [zeros] * 4 + [[]], fused=True,
                           stream=2)
    normals = noise.langevin_noise(5, tf.constant(7, tf.int64),
                                   tf.constant(3, tf.int64), LARGE,
                                   stream=2, use_kernel=True)
    noise_std = tf.sqrt(tf.constant(0.1)) * tf.constant(1e-2)
    for sample, normal in zip(samples, normals):
      np.testing.assert_array_equal(sample.numpy(),
                                    (noise_std * normal).numpy())
    other = update(hp, [zeros] * 4 + [[]], fused=True, stream=2,
                   inner_step=tf.constant(4, tf.int64))[0]
    self.assertFalse(np.array_equal(samples[0].numpy(), other[0].numpy()))

  def trajectories(self):
    """Final weights of two outer steps (L = 3) fused and unfused, inside
    tf.function as the optimizer runs."""
    results = []
    for fused in (None, False):
      rng = np.random.default_rng(0)
      parameters = [tf.Variable(t) for t in tensors(rng, SHAPES)]
      gradients = tensors(rng, SHAPES)
      optimizer = optimizers.EntropySGD(num_langevin_steps=3, noise=1e-3,
                                        weight_decay=1e-3,
                                        conventions="lua_reference")
      optimizer.fused_update = fused
      optimizer.initialize(parameters)

      @tf.function
      def run(parameters=parameters, gradients=gradients,
              optimizer=optimizer):
        for _ in range(2):
          optimizer.begin_outer_step(parameters)
          for _ in range(3):
            optimizer.apply(gradients, parameters)
          optimizer.end_outer_step(parameters)

      run()
      results.append([p.numpy() for p in parameters])
    return zip(*results)

  def test_optimizer_trajectory_within_rounding(self):
    eps = np.finfo(np.float32).eps
    for fused, unfused in self.trajectories():
      scale = np.max(np.abs(unfused))
      worst = np.max(np.abs(fused - unfused)) / (eps * scale)
      print(f"worst difference {worst:.2f} eps x max|x| on {fused.shape}")
      self.assertLessEqual(worst, 4.0)

  def test_optimizer_trajectory_bit_identical_without_graph_rewrites(self):
    options = tf.config.optimizer.get_experimental_options()
    tf.config.optimizer.set_experimental_options(
        {"arithmetic_optimization": False})
    try:
      for fused, unfused in self.trajectories():
        np.testing.assert_array_equal(fused, unfused)
    finally:
      tf.config.optimizer.set_experimental_options(
          {"arithmetic_optimization": options.get("arithmetic_optimization",
                                                  True)})


class ChoiceTest(absltest.TestCase):

  def test_float64_and_disabled_kernel_take_the_unfused_math(self):
    float64 = [tf.zeros([3], tf.float64)]
    self.assertFalse(langevin.fuses(float64, use_kernel=True))
    self.assertFalse(langevin.fuses([tf.zeros([3])], use_kernel=False))
    self.assertFalse(langevin.fuses([tf.zeros([3])], fused=False))
    with self.assertRaises(noise.KernelUnavailableError):
      langevin.fuses(float64, use_kernel=True, fused=True)
    with self.assertRaises(ValueError):
      langevin.fuses([tf.zeros([3])], use_kernel=False, fused=True)

  def test_float64_update_runs(self):
    hp = algorithm.Hyperparameters(noise=1e-3)
    state = [[tf.ones([4], tf.float64)] for _ in range(4)] + [[]]
    samples, means, _ = update(hp, state, fused=None, use_kernel=None)
    self.assertEqual(samples[0].dtype, tf.float64)
    self.assertEqual(means[0].dtype, tf.float64)


if __name__ == "__main__":
  absltest.main()
