"""Algorithm 1 on NumPy arrays, against analytic answers.

`algorithm.py` must run on any array library: here it runs on NumPy alone.
The trajectories of the TensorFlow and Keras front ends are checked against
an independent transcription in `train_step_test` and `keras_plugin_test`.
"""

import dataclasses
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from entropy_sgd.core import algorithm

NUMPY_OPS = algorithm.Ops(
    sqrt=np.sqrt, exp=np.exp, sum=np.sum,
    cast=lambda value, like: np.asarray(value, np.asarray(like).dtype))


class FrameworkNeutralTest(absltest.TestCase):

  def test_imports_no_framework(self):
    code = ("import sys; import entropy_sgd.core.algorithm; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'sonnet', 'jax', "
            "'torch', 'numpy') if m in sys.modules))")
    output = subprocess.run([sys.executable, "-c", code], check=True,
                            capture_output=True, text=True).stdout
    self.assertEqual(output.strip(), "[]")


class GammaTest(parameterized.TestCase):

  @parameterized.parameters("paper", "lua_reference")
  def test_scoping_grows(self, preset):
    conventions = algorithm.PRESETS[preset]
    hp = algorithm.Hyperparameters(gamma=0.03, scoping=1e-3,
                                   conventions=conventions)
    like = np.zeros([], np.float64)
    for t in (0, 1, 7, 20_000):
      expected = 0.03 * 1.001**(t + conventions.scoping_offset)
      self.assertAlmostEqual(
          float(algorithm.gamma_at(hp, t, like, NUMPY_OPS)), expected,
          delta=1e-10 * expected)  # exp(t log1p) vs **.

  def test_pytorch_reference_freezes_gamma(self):
    hp = algorithm.Hyperparameters(
        gamma=0.03, scoping=0.5, conventions=algorithm.PYTORCH_REFERENCE)
    like = np.zeros([], np.float64)
    self.assertEqual(float(algorithm.gamma_at(hp, 9, like, NUMPY_OPS)), 0.03)


class LangevinTest(parameterized.TestCase):

  def test_noiseless_chain_reaches_the_gibbs_mean(self):
    # f(x') = a/2 x'^2: the SGLD step has its fixed point where
    # a x' = gamma (x - x'), x' = gamma x / (a + gamma); mu follows it.
    a, gamma, x = np.array([0.5, 2.0, 8.0]), 1.5, np.array([1.0, -2.0, 3.0])
    hp = algorithm.Hyperparameters(gamma=gamma, scoping=0.0, noise=0.0,
                                   alpha=0.1)
    sample, mean = [x.copy()], [x.copy()]
    for _ in range(3000):
      sample, mean, _ = algorithm.langevin_update(
          hp, sample, [x], mean, [a * sample[0]], [], None, step=0,
          langevin_learning_rate=0.05, ops=NUMPY_OPS)
    np.testing.assert_allclose(sample[0], gamma * x / (a + gamma), rtol=1e-10)
    np.testing.assert_allclose(mean[0], gamma * x / (a + gamma), rtol=1e-8)

  @parameterized.parameters(("paper", 1.0), ("lua_reference", 2.0))
  def test_noise_moves_the_sample_by_its_std(self, preset, factor):
    hp = algorithm.Hyperparameters(
        noise=1e-2, weight_decay=0.0, conventions=algorithm.PRESETS[preset])
    x = np.array([0.3, -0.7])
    z = np.array([1.5, -0.25])
    samples, _, _ = algorithm.langevin_update(
        hp, [x], [x], [x], [np.zeros(2)],
        [np.zeros(2)] if hp.conventions.inner_momentum else [], [z], step=0,
        langevin_learning_rate=0.04, ops=NUMPY_OPS)
    np.testing.assert_allclose(samples[0] - x,
                               np.sqrt(factor * 0.04) * 1e-2 * z, rtol=1e-12)

  @parameterized.parameters(("new_sample", 0.75), ("old_mean", 0.25))
  def test_running_mean_weights(self, alpha_weights, new_sample_weight):
    conventions = dataclasses.replace(algorithm.PAPER,
                                      alpha_weights=alpha_weights)
    hp = algorithm.Hyperparameters(noise=0.0, alpha=0.75,
                                   conventions=conventions)
    x, g = np.array([1.0]), np.array([2.0])
    samples, means, _ = algorithm.langevin_update(
        hp, [x], [x], [x], [g], [], None, step=0, langevin_learning_rate=0.1,
        ops=NUMPY_OPS)
    w = new_sample_weight
    np.testing.assert_allclose(means[0], (1 - w) * x + w * samples[0])


class OuterStepTest(parameterized.TestCase):

  @parameterized.parameters(("paper", True), ("lua_reference", False))
  def test_outer_step(self, preset, scaled_by_gamma):
    hp = algorithm.Hyperparameters(gamma=0.2, scoping=0.0,
                                   conventions=algorithm.PRESETS[preset])
    x, mu = np.array([1.0, 2.0]), np.array([0.5, 2.5])
    anchors, velocities = algorithm.outer_update(
        hp, [x], [mu], [], step=3, learning_rate=0.7, ops=NUMPY_OPS)
    scale = 0.2 * (1.0 if preset == "paper" else 0.0) + (
        0.0 if scaled_by_gamma else 1.0)
    np.testing.assert_allclose(anchors[0], x - 0.7 * scale * (x - mu))
    self.assertEqual(velocities, [])

  def test_distance(self):
    xs, ys = [np.array([3.0]), np.array([[4.0]])], [np.zeros(1),
                                                    np.zeros((1, 1))]
    self.assertAlmostEqual(float(algorithm.distance(xs, ys, NUMPY_OPS)), 5.0)


class HyperparametersTest(parameterized.TestCase):

  @parameterized.parameters(
      dict(num_langevin_steps=0), dict(num_langevin_steps=2.0),
      dict(num_langevin_steps=True), dict(gamma=0.0), dict(scoping=-1.0),
      dict(noise=-1.0), dict(weight_decay=-1.0), dict(alpha=0.0),
      dict(alpha=1.5))
  def test_bad_values(self, **kwargs):
    with self.assertRaises(ValueError):
      algorithm.Hyperparameters(**kwargs)

  def test_resolve_conventions(self):
    self.assertIs(algorithm.resolve_conventions("paper"), algorithm.PAPER)
    as_dict = dataclasses.asdict(algorithm.LUA_REFERENCE)
    self.assertEqual(algorithm.resolve_conventions(as_dict),
                     algorithm.LUA_REFERENCE)
    with self.assertRaisesRegex(ValueError, "Unknown conventions preset"):
      algorithm.resolve_conventions("torch")

  @parameterized.parameters((True, True), (True, False), (False, True))
  def test_begin_outer_step(self, needs_anchor_gradient, first):
    conventions = (algorithm.PYTORCH_REFERENCE if needs_anchor_gradient
                   else algorithm.LUA_REFERENCE)
    hp = algorithm.Hyperparameters(conventions=conventions)
    self.assertEqual(hp.needs_anchor_gradient, needs_anchor_gradient)
    x = [np.array([1.0, -2.0]), np.array([[3.0]])]
    inner = [np.array([0.5, 0.5]), np.array([[-1.0]])]
    outer = [np.array([7.0, 8.0]), np.array([[9.0]])]
    anchor_gradients = [np.array([0.1, 0.2]), np.array([[0.3]])]
    anchors, means, new_inner, new_outer = algorithm.begin_outer_step(
        hp, x, inner, outer, anchor_gradients, first,
        zeros_like=np.zeros_like, where=np.where)
    for got, want in zip(anchors + means, x + x):
      np.testing.assert_array_equal(got, want)
    for got, like in zip(new_inner, inner):
      np.testing.assert_array_equal(got, np.zeros_like(like))
    expected = (anchor_gradients if needs_anchor_gradient and first
                else outer)
    for got, want in zip(new_outer, expected):
      np.testing.assert_array_equal(got, want)

  def test_gradient_evaluations(self):
    self.assertEqual(algorithm.Hyperparameters(
        num_langevin_steps=5).gradient_evaluations_per_step, 5)
    self.assertEqual(algorithm.Hyperparameters(
        num_langevin_steps=5, conventions=algorithm.PYTORCH_REFERENCE
    ).gradient_evaluations_per_step, 6)


if __name__ == "__main__":
  absltest.main()
