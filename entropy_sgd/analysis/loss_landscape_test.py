"""Landscape measures against closed forms on quadratics, and invariances."""

from absl.testing import parameterized
import numpy as np
import sonnet as snt
import tensorflow as tf

from entropy_sgd.analysis import hessian
from entropy_sgd.analysis import loss_landscape
from entropy_sgd.analysis import testing as analysis_testing
from entropy_sgd.core import distribution


def quadratic_objective(matrix, linear, x0):
  return analysis_testing.quadratic_objective(
      analysis_testing.Quadratic(matrix, x0, linear))


def local_entropy_closed_form(matrix, linear, x, gamma, temperature):
  """Phi = T log E_{N(x, T/gamma)} exp(-f/T) for f = 1/2 x'Ax' + b'x'."""
  n = len(x)
  shifted = gamma * x - linear
  return (-0.5 * temperature * np.linalg.slogdet(np.eye(n) +
                                                 matrix / gamma)[1] +
          0.5 * shifted @ np.linalg.solve(matrix + gamma * np.eye(n),
                                          shifted) -
          0.5 * gamma * x @ x)


def sgld_target(matrix, linear, x, gamma, temperature, betas, weights,
                step_sizes):
  """-sum_k w_k E[f] under the exact stationary law of the discretised
  chain at each beta: mean K^-1 (gamma x - beta b), covariance
  T / (k (1 - eta k / 2)) per eigenvalue k of K = beta A + gamma I."""
  n = len(x)
  total = 0.0
  for beta, weight, eta in zip(betas, weights, step_sizes):
    k_matrix = beta * matrix + gamma * np.eye(n)
    mean = np.linalg.solve(k_matrix, gamma * x - beta * linear)
    k, q = np.linalg.eigh(k_matrix)
    covariance = (q * (temperature / (k * (1 - eta * k / 2)))) @ q.T
    expected = (0.5 * mean @ matrix @ mean + linear @ mean +
                0.5 * np.trace(matrix @ covariance))
    total -= weight * expected
  return total


class LocalEntropyTest(tf.test.TestCase):

  def test_quadratic_against_closed_form(self):
    # 40 independent copies of a 5-d quadratic: Phi adds up over copies
    # while the chains' noise adds up only in quadrature.
    spectrum = np.array([0.2, 0.5, 1.0, 2.0, 4.0])
    copies = 40
    matrix = np.kron(np.eye(copies), analysis_testing.random_symmetric(spectrum, seed=1))
    linear = np.tile([0.3, -0.2, 0.1, 0.0, 0.4], copies)
    minimum = -np.linalg.solve(matrix, linear)
    x = minimum + np.tile([0.2, -0.1, 0.0, 0.3, 0.1], copies)
    gamma, temperature = 1.0, 0.5
    objective = quadratic_objective(matrix, linear, x)
    estimate = loss_landscape.local_entropy(
        objective, gamma, temperature, num_betas=5, steps=200, burn_in=100,
        chains=4, step_fraction=0.05, curvature=4.0, seed=3)
    np.testing.assert_allclose(objective.get_flat(), x)  # Restored.
    target = sgld_target(matrix, linear, x, gamma, temperature,
                         estimate.betas, estimate.beta_weights,
                         estimate.step_sizes)
    exact = local_entropy_closed_form(matrix, linear, x, gamma, temperature)
    # The estimator hits what the chain samples, within its standard error.
    self.assertLess(abs(estimate.value - target), 4 * estimate.stderr,
                    (estimate.value, target, estimate.stderr))
    self.assertLess(estimate.stderr, 0.03 * abs(exact))
    # That target is the closed form up to SGLD's O(eta) bias (about
    # step_fraction / 2 of the curvature term) and the quadrature error.
    curvature_term = copies * 0.5 * temperature * np.sum(
        np.log1p(spectrum / gamma))
    self.assertLess(abs(target - exact), 0.03 * curvature_term)
    self.assertAlmostEqual(estimate.loss_at_x, 0.5 * x @ matrix @ x +
                           linear @ x, places=8)
    self.assertAlmostEqual(estimate.deficit,
                           (-estimate.loss_at_x - estimate.value) /
                           temperature)

  def test_deficit_at_a_minimum_is_half_the_log_volume_ratio(self):
    spectrum = np.array([0.5, 3.0])
    matrix = np.diag(spectrum)
    phi = local_entropy_closed_form(matrix, np.zeros(2), np.zeros(2), 2.0,
                                    0.1)
    self.assertAlmostEqual(-phi / 0.1,
                           0.5 * np.sum(np.log1p(spectrum / 2.0)))


class SharpnessTest(tf.test.TestCase):

  def test_equals_the_analytic_box_maximum_on_a_diagonal_quadratic(self):
    diagonal = np.array([0.5, 1.0, 2.0, 3.0])
    x = np.array([1.0, -2.0, 0.0, 0.5])
    objective = quadratic_objective(np.diag(diagonal), np.zeros(4), x)
    epsilon = 0.1
    result = loss_landscape.epsilon_sharpness(objective, epsilon, num_steps=20)
    np.testing.assert_allclose(objective.get_flat(), x)
    loss = 0.5 * diagonal @ x**2
    bound = epsilon * (np.abs(x) + 1)
    best = 0.5 * diagonal @ (np.abs(x) + bound)**2  # At a vertex.
    self.assertAlmostEqual(result.loss_at_x, loss)
    self.assertAlmostEqual(result.max_loss, best, places=9)
    self.assertAlmostEqual(result.value, 100 * (best - loss) / (1 + loss),
                           places=7)

  def test_is_non_negative_at_a_maximum(self):
    # At the maximum of a concave quadratic every ascent step fails.
    objective = quadratic_objective(-np.eye(3), np.zeros(3), np.zeros(3))
    result = loss_landscape.epsilon_sharpness(objective, 1e-2, num_steps=5)
    self.assertEqual(result.value, 0.0)
    self.assertGreaterEqual(result.max_loss, result.loss_at_x)


class MLP(snt.Module):
  """Linear -> BatchNorm -> ReLU, twice, then logits (with a bias)."""

  def __init__(self):
    super().__init__()
    self.hidden = [snt.Linear(7, with_bias=False), snt.Linear(6,
                                                              with_bias=False)]
    self.norms = [snt.BatchNorm(True, True, decay_rate=0.9) for _ in range(2)]
    self.logits = snt.Linear(3)

  def __call__(self, images, is_training, use_dropout=None):  # No dropout
    net = images
    for linear, bn in zip(self.hidden, self.norms):
      net = tf.nn.relu(bn(linear(net), is_training=is_training,
                          test_local_stats=False))
    return self.logits(net)


def mlp_objective():
  strategy = tf.distribute.get_strategy()
  with distribution.replica_local_statistics():
    model = MLP()
    model(tf.zeros([1, 4]), is_training=False)
  rng = np.random.default_rng(0)
  for variable in model.trainable_variables:
    variable.assign(rng.standard_normal(variable.shape).astype(np.float32))
  images = tf.random.stateless_normal([32, 4], [1, 2])
  labels = tf.random.stateless_uniform([32], [3, 4], maxval=3,
                                       dtype=tf.int32)
  dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
  batches = hessian.Batches(strategy, lambda context: dataset.repeat(), 2)
  hessian.recalibrate_batch_norm(model, batches)
  return model, batches, hessian.Objective(
      hessian.classification_loss(model), model.trainable_variables, batches)


class DirectionTest(parameterized.TestCase, tf.test.TestCase):

  def test_filters_have_the_weights_norms(self):
    model, _, objective = mlp_objective()
    parameters = objective.parameters
    excluded = loss_landscape.excluded_from_directions(model, parameters)
    kept = {p.ref() for p, skip in zip(parameters, excluded) if not skip}
    self.assertEqual(kept, {model.hidden[0].w.ref(), model.hidden[1].w.ref(),
                            model.logits.w.ref()})
    weights = [p.numpy() for p in parameters]
    direction = loss_landscape.filter_normalized_direction(
        weights, excluded, np.random.default_rng(11))
    for w, d, skip in zip(weights, direction, excluded):
      if skip:
        self.assertAllEqual(d, np.zeros_like(w))
        continue
      self.assertAllClose(np.linalg.norm(d, axis=0),
                          np.linalg.norm(w, axis=0), rtol=1e-6)
      self.assertNotAllClose(d, w)

  def test_conv_filters_are_output_channels(self):
    w = np.random.default_rng(1).standard_normal((3, 3, 2, 5))
    d, = loss_landscape.filter_normalized_direction([w], [False],
                                               np.random.default_rng(2))
    self.assertAllClose(np.sqrt(np.sum(d**2, axis=(0, 1, 2))),
                        np.sqrt(np.sum(w**2, axis=(0, 1, 2))))

  def test_scaling_filters_before_batch_norm_changes_nothing(self):
    """f(c x + a c d) = f(x + a d): BatchNorm undoes per-filter scales and
    the filter-normalised direction scales with the filters."""
    model, batches, objective = mlp_objective()
    parameters = objective.parameters
    excluded = loss_landscape.excluded_from_directions(model, parameters)
    alphas = np.linspace(-1, 1, 5)

    def curve():
      hessian.recalibrate_batch_norm(model, batches)
      weights = [p.numpy() for p in parameters]
      direction = loss_landscape.filter_normalized_direction(
          weights, excluded, np.random.default_rng(7))
      losses, accuracies = loss_landscape.loss_along_line(
          objective, objective.flatten(direction), alphas)
      return direction, losses, accuracies

    direction, losses, accuracies = curve()
    rng = np.random.default_rng(3)
    scales = []
    for linear in model.hidden:  # Each followed by BatchNorm.
      c = rng.uniform(0.3, 3.0, linear.w.shape[-1]).astype(np.float32)
      linear.w.assign(linear.w * c)
      scales.append(c)
    scaled_direction, scaled_losses, scaled_accuracies = curve()
    self.assertAllClose(scaled_losses, losses, rtol=1e-4)
    self.assertAllEqual(scaled_accuracies, accuracies)
    self.assertGreater(np.ptp(losses), 0.1)  # The curve is not flat.
    index = {p.ref(): i for i, p in enumerate(parameters)}
    for linear, c in zip(model.hidden, scales):
      i = index[linear.w.ref()]
      self.assertAllClose(scaled_direction[i], direction[i] * c, rtol=1e-5)


class LineTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.matrix = analysis_testing.random_symmetric(np.array([1.0, 2.0, -0.5]), seed=2)
    self.linear = np.array([0.1, 0.0, -0.3])
    self.x = np.array([0.5, -1.0, 2.0])
    self.objective = quadratic_objective(self.matrix, self.linear, self.x)

  def f(self, point):
    return 0.5 * point @ self.matrix @ point + self.linear @ point

  def test_line_plane_and_interpolation_evaluate_f(self):
    d1, d2 = np.array([1.0, 0.0, 2.0]), np.array([0.0, -1.0, 1.0])
    alphas = np.linspace(-1, 1, 5)
    losses, _ = loss_landscape.loss_along_line(self.objective, d1, alphas)
    self.assertAllClose(losses, [self.f(self.x + a * d1) for a in alphas])
    betas = np.array([-0.5, 0.5])
    grid, _ = loss_landscape.loss_on_plane(self.objective, d1, d2, alphas, betas)
    self.assertAllClose(grid, [[self.f(self.x + a * d1 + b * d2)
                                for a in alphas] for b in betas])
    end = np.array([3.0, 1.0, 0.0])
    alphas = np.linspace(-0.5, 1.5, 5)
    calls = []
    losses, _ = loss_landscape.interpolate(self.objective, self.x, end, alphas,
                                      recalibrate=lambda: calls.append(1))
    self.assertAllClose(losses, [self.f((1 - a) * self.x + a * end)
                                 for a in alphas])
    self.assertLen(calls, 5)
    self.assertAllClose(self.objective.get_flat(), self.x)


if __name__ == "__main__":
  tf.test.main()
