"""Scale-aware flatness: closed forms on quadratics, and the invariance
that motivates them (rescaling the weights into a BatchNorm layer)."""

import numpy as np
import sonnet as snt
import tensorflow as tf

from entropy_sgd.analysis import adaptive_flatness
from entropy_sgd.analysis import hessian
from entropy_sgd.analysis import linear_algebra
from entropy_sgd.analysis import testing as analysis_testing

NUM_FEATURES, NUM_HIDDEN, NUM_CLASSES, BATCH = 6, 8, 3, 64


def quadratic_objective(diagonal, x0):
  """f(x) = 1/2 sum_i a_i x_i^2."""
  return analysis_testing.quadratic_objective(
      analysis_testing.Quadratic(np.diag(diagonal), x0))


class ClosedFormTest(tf.test.TestCase):

  def test_worst_case_is_the_box_vertex_on_a_diagonal_quadratic(self):
    a = np.array([0.5, 1.0, 2.0, 3.0])
    x = np.array([1.0, -2.0, 0.3, 0.5])
    rho = 0.1
    result = adaptive_flatness.adaptive_sharpness(
        quadratic_objective(a, x), rho=rho, steps=20, samples=2)
    f = 0.5 * a @ x**2
    # The maximum of a separable convex f over |d_i| <= rho |x_i| is at
    # d = rho x: f((1 + rho) x) - f(x) = ((1 + rho)^2 - 1) f(x).
    self.assertAlmostEqual(result.worst_case, ((1 + rho)**2 - 1) * f,
                           places=9)
    self.assertAlmostEqual(result.loss_at_w, f)

  def test_average_is_rho_squared_f_on_a_diagonal_quadratic(self):
    a = np.array([0.5, 1.0, 2.0, 3.0])
    x = np.array([1.0, -2.0, 0.3, 0.5])
    rho, samples = 0.2, 400
    result = adaptive_flatness.adaptive_sharpness(
        quadratic_objective(a, x), rho=rho, steps=1, samples=samples)
    # E f(x + d) - f(x) = 1/2 sum a_i rho^2 x_i^2 = rho^2 f(x).
    expected = rho**2 * 0.5 * a @ x**2
    self.assertLess(abs(result.average - expected),
                    4 * result.average_standard_error)
    self.assertGreater(result.average_standard_error, 0)

  def test_pac_bayes_sigma_solves_the_error_budget(self):
    # With "error" = f (accuracy 1 - f) and eps -> 0, E error increase at
    # sigma is sigma^2 f(x); it equals the budget at sigma* = sqrt(b / f).
    a = np.array([1.0, 2.0])
    x = np.array([1.0, 1.0])
    f = 0.5 * a @ x**2
    budget = 0.3
    # 50,000 evaluations of f: NumPy's, as only its values matter here.
    result = adaptive_flatness.pac_bayes_flatness(
        analysis_testing.NumpyQuadraticObjective(
            np.diag(a), x, accuracy=lambda loss: 1.0 - loss),
        max_error_increase=budget, epsilon=1e-9, samples=2000,
        bisections=25, sigma_range=(1e-3, 10.0))
    sigma_star = np.sqrt(budget / f)
    self.assertAlmostEqual(result.sigma / sigma_star, 1.0, delta=0.06)
    self.assertAlmostEqual(result.measure, 1 / result.sigma**2)
    self.assertLessEqual(result.error_increase_at_sigma, budget)


class BatchNormMLP(snt.Module):
  """x -> BN(x W1) -> tanh -> logits, inference mode; BN eps ~ 0 so that
  rescaling W1 with the statistics leaves the function exactly unchanged."""

  def __init__(self):
    super().__init__(name="bn_mlp")
    self.hidden = snt.Linear(NUM_HIDDEN, with_bias=False, name="hidden")
    self.bn = snt.BatchNorm(True, True, eps=1e-12, name="bn")
    self.logits = snt.Linear(NUM_CLASSES, name="logits")

  def __call__(self, x, is_training, use_dropout=None):  # No dropout.
    return self.logits(tf.tanh(self.bn(self.hidden(x),
                                       is_training=is_training)))


def bn_objective(scale):
  """The objective of BatchNormMLP with W1 and its BN statistics scaled."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(BATCH, NUM_FEATURES))
  y = rng.integers(NUM_CLASSES, size=BATCH).astype(np.int32)
  model = BatchNormMLP()
  model(tf.zeros([2, NUM_FEATURES], tf.float64), is_training=True)
  for v in model.trainable_variables:
    v.assign(rng.normal(scale=0.7, size=v.shape))
  hidden = (x @ model.hidden.w.numpy())
  model.bn.moving_mean.average.assign(hidden.mean(0, keepdims=True))
  model.bn.moving_variance.average.assign(hidden.var(0, keepdims=True))
  model.hidden.w.assign(scale * model.hidden.w)
  model.bn.moving_mean.average.assign(scale * model.bn.moving_mean.average)
  model.bn.moving_variance.average.assign(
      scale**2 * model.bn.moving_variance.average)
  dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
  batches = hessian.Batches(tf.distribute.get_strategy(),
                            lambda context: dataset, 1)
  return hessian.Objective(hessian.classification_loss(model),
                           list(model.trainable_variables), batches)


class RescalingInvarianceTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.original, self.rescaled = bn_objective(1.0), bn_objective(0.1)

  def test_the_function_is_unchanged(self):
    self.assertAllClose(self.original.loss_and_accuracy(),
                        self.rescaled.loss_and_accuracy(), rtol=1e-9)

  def test_lambda_max_is_not_invariant(self):
    def lambda_max(objective, block_only):
      # The top eigenvalue of H, or of its block of the weights into BN.
      mask = np.ones(objective.num_parameters)
      if block_only:
        mask[:] = 0
        offset = 0
        for variable, size in zip(objective.parameters, objective.sizes):
          if "hidden/w" in variable.name:
            mask[offset:offset + size] = 1
          offset += size
      start = np.random.default_rng(1).normal(size=mask.size) * mask
      return linear_algebra.power_iteration(lambda v: mask * objective.hvp(v * mask),
                                     start, 300, tolerance=1e-12).eigenvalue

    block = (lambda_max(self.rescaled, True) /
             lambda_max(self.original, True))
    self.assertAlmostEqual(block, 100.0, delta=0.5)  # Exactly 1/scale^2.
    full = lambda_max(self.rescaled, False) / lambda_max(self.original, False)
    self.assertGreater(full, 5.0)  # Same function, a far sharper lambda_max.

  def test_adaptive_sharpness_is_invariant(self):
    for objective in (self.original, self.rescaled):
      objective.result = adaptive_flatness.adaptive_sharpness(
          objective, rho=0.05, steps=8, samples=6, seed=3)
    a, b = self.original.result, self.rescaled.result
    self.assertGreater(a.worst_case, 0)
    self.assertAllClose([a.worst_case, a.average],
                        [b.worst_case, b.average], rtol=1e-6, atol=1e-12)

  def test_pac_bayes_flatness_is_invariant(self):
    results = [adaptive_flatness.pac_bayes_flatness(
        objective, max_error_increase=0.05, epsilon=0.0, samples=6,
        bisections=12, seed=5)
               for objective in (self.original, self.rescaled)]
    self.assertEqual(results[0].sigma, results[1].sigma)
    self.assertLess(results[0].sigma, 10.0)  # Found inside the range.


if __name__ == "__main__":
  tf.test.main()
