"""Analytic and API tests of the optimizers.

The step-by-step comparison with an independent NumPy Algorithm 1 is in
`train_step_test.py`; here the optimizers meet closed-form answers on the
quadratic f(x) = 1/2 x^T A x, and misuse meets clear errors.
"""

import dataclasses
import decimal

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from entropy_sgd.core import optimizers

A_DIAG = np.array([0.5, 1.0, 2.0, 4.0])
X0 = np.array([1.0, -2.0, 0.5, 3.0])


def gibbs_mean(x, a, gamma):
  """E[x'] under exp(-(f(x') + gamma/2 |x - x'|^2) / T): gamma (A+gamma)^-1 x."""
  return gamma * x / (a + gamma)


def run_langevin_on_quadratic(a, x0, gamma, num_steps, langevin_lr, noise,
                              alpha, conventions="paper", learning_rate=1.0,
                              seed=0):
  """One outer step of Entropy-SGD on f = 1/2 sum(a x^2).

  Returns (final x', mu before the outer step, x after it, metrics).
  """
  x = tf.Variable(x0.astype(np.float32))
  a = tf.constant(a.astype(np.float32))
  optimizer = optimizers.EntropySGD(
      learning_rate=learning_rate, num_langevin_steps=num_steps,
      langevin_learning_rate=langevin_lr, gamma=gamma, scoping=0.0,
      noise=noise, alpha=alpha, conventions=conventions, seed=seed)
  optimizer.initialize([x])

  @tf.function
  def inner_loop():
    optimizer.begin_outer_step([x])
    for _ in tf.range(num_steps):
      optimizer.apply([a * x], [x])

  inner_loop()
  sample, mean = x.numpy().astype(np.float64), optimizer.mean[0].numpy()
  metrics = optimizer.end_outer_step([x])
  return sample, mean.astype(np.float64), x.numpy().astype(np.float64), metrics


class LocalEntropyAnalyticTest(tf.test.TestCase, parameterized.TestCase):

  def test_noiseless_mean_reaches_the_gibbs_mean(self):
    gamma = 1.0
    _, mu, _, _ = run_langevin_on_quadratic(
        A_DIAG, X0, gamma, num_steps=3000, langevin_lr=0.01, noise=0.0,
        alpha=0.75)
    self.assertAllClose(mu, gibbs_mean(X0, A_DIAG, gamma), atol=1e-5)

  def test_noisy_mean_is_within_its_standard_error(self):
    gamma, lr, eps, alpha, steps = 1.0, 0.01, 1e-2, 2e-3, 6000
    _, mu, _, _ = run_langevin_on_quadratic(
        A_DIAG, X0, gamma, num_steps=steps, langevin_lr=lr, noise=eps,
        alpha=alpha)
    # x' is an AR(1) process around mu*: rho = 1 - lr k, k = a + gamma,
    # stationary variance lr eps^2 / (1 - rho^2). An exponential average with
    # weight alpha has variance var * alpha / (2 - alpha) * (1 + r) / (1 - r)
    # with r = rho (1 - alpha), to first order.
    k = A_DIAG + gamma
    rho = 1 - lr * k
    variance = lr * eps**2 / (1 - rho**2)
    r = rho * (1 - alpha)
    mean_std = np.sqrt(variance * alpha / (2 - alpha) * (1 + r) / (1 - r))
    tolerance = 5 * mean_std + 1e-5
    error = np.abs(mu - gibbs_mean(X0, A_DIAG, gamma))
    self.assertTrue(np.all(error <= tolerance), f"{error} > {tolerance}")
    self.assertLess(tolerance.max(), 0.02)  # The claim is not vacuous.

  @parameterized.parameters(("sqrt_lr", 1.0), ("sqrt_2lr", 2.0))
  def test_noise_convention_sets_the_stationary_variance(
      self, noise_scale, variance_factor):
    # Many identical coordinates: the spread of x' across them after a long
    # loop is the stationary variance lr eps^2 / (1 - rho^2) of the AR(1)
    # process x' follows, times 2 for the reference code's noise scale.
    dim, a_value, gamma, lr, eps = 4000, 1.0, 1.0, 0.05, 0.1
    sample, _, _, _ = run_langevin_on_quadratic(
        np.full(dim, a_value), np.zeros(dim), gamma, num_steps=400,
        langevin_lr=lr, noise=eps, alpha=0.75,
        conventions=dataclasses.replace(optimizers.PAPER,
                                        noise_scale=noise_scale))
    rho = 1 - lr * (a_value + gamma)
    expected = variance_factor * lr * eps**2 / (1 - rho**2)
    self.assertAllClose(sample.var(), expected, rtol=0.1)

  def test_local_entropy_gradient_limits(self):
    # gamma (x - mu*) = gamma A (A + gamma)^-1 x: -> A x as gamma -> inf,
    # -> 0 as gamma -> 0. Checked through the optimizer's own outer step.
    errors_to_ax, norms = [], []
    for gamma in (1e-3, 1e-1, 1.0, 10.0, 1e3):
      lr = 0.5 / (A_DIAG.max() + gamma)  # Stable SGLD step.
      steps = int(40 / (lr * (A_DIAG.min() + gamma))) + 10
      _, mu, x_after, metrics = run_langevin_on_quadratic(
          A_DIAG, X0, gamma, num_steps=steps, langevin_lr=lr, noise=0.0,
          alpha=1.0, learning_rate=0.5)
      gradient = gamma * (X0 - mu)
      analytic = gamma * A_DIAG * X0 / (A_DIAG + gamma)
      self.assertAllClose(gradient, analytic, rtol=2e-3, atol=1e-7)
      # Paper convention: x <- x - eta * gamma (x - mu).
      self.assertAllClose(x_after, X0 - 0.5 * gradient, rtol=1e-5,
                          atol=1e-6)
      self.assertAllClose(metrics["anchor_to_mean_distance"],
                          np.linalg.norm(X0 - mu), rtol=1e-4)
      errors_to_ax.append(np.linalg.norm(gradient - A_DIAG * X0))
      norms.append(np.linalg.norm(gradient))
    self.assertLess(norms[0], 1.01e-3 * np.linalg.norm(X0))
    self.assertLess(errors_to_ax[-1], 5e-3 * np.linalg.norm(A_DIAG * X0))
    self.assertEqual(errors_to_ax, sorted(errors_to_ax, reverse=True))


class ScopingTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(("paper", 0), ("lua_reference", 1))
  def test_gamma_follows_the_closed_form(self, conventions, offset):
    optimizer = optimizers.EntropySGD(gamma=0.03, scoping=1e-3,
                                      conventions=conventions)
    for t in (0, 1, 2, 10, 1000, 20000):
      self.assertAllClose(optimizer.gamma(t),
                          0.03 * (1 + 1e-3)**(t + offset), rtol=2e-6)

  def test_gamma_in_float64(self):
    optimizer = optimizers.EntropySGD(gamma=0.03, scoping=1e-3)
    with decimal.localcontext() as context:
      context.prec = 40
      for t in (0, 1, 10, 1000, 20000):
        # Exact: (1 + 1e-3)**t in float64 would be off by t ulps.
        exact = float(decimal.Decimal(0.03) *
                      (1 + decimal.Decimal(1e-3))**t)
        gamma = optimizer.gamma(t, tf.float64)
        self.assertEqual(gamma.dtype, tf.float64)
        self.assertAllClose(gamma, exact, rtol=1e-14, atol=0)

  def test_pytorch_reference_never_advances(self):
    optimizer = optimizers.EntropySGD(gamma=0.03, scoping=1e-3,
                                      conventions="pytorch_reference")
    for t in (0, 1, 1000):
      self.assertEqual(float(optimizer.gamma(t, tf.float64)), 0.03)

  def test_gamma_grows_with_every_outer_step(self):
    x = tf.Variable([1.0, 2.0])
    optimizer = optimizers.EntropySGD(num_langevin_steps=2, gamma=0.5,
                                      scoping=0.1)
    optimizer.initialize([x])
    gammas = []
    for _ in range(4):
      optimizer.begin_outer_step([x])
      for _ in range(2):
        optimizer.apply([x * 1.0], [x])
      gammas.append(float(optimizer.end_outer_step([x])["gamma"]))
    self.assertAllClose(gammas, [0.5 * 1.1**t for t in range(4)], rtol=1e-6)
    self.assertEqual(int(optimizer.step.numpy()), 4)


class Float64Test(tf.test.TestCase, parameterized.TestCase):
  """Python-float hyperparameters reach float64 parameters exactly."""

  def test_python_floats_are_not_rounded_to_float32(self):
    like = tf.zeros([], tf.float64)
    self.assertEqual(float(optimizers.TF_OPS.cast(0.1, like)), 0.1)
    self.assertNotEqual(float(tf.cast(0.1, tf.float64)), 0.1)  # The trap.

  def test_sgd_step(self):
    x = tf.Variable(tf.constant([1.0, -2.0], tf.float64))
    optimizer = optimizers.SGD(0.1, weight_decay=0.3)
    optimizer.initialize([x])
    optimizer.apply([tf.constant([0.7, 0.2], tf.float64)], [x])
    expected = np.array([1.0, -2.0]) - 0.1 * (np.array([0.7, 0.2]) +
                                              0.3 * np.array([1.0, -2.0]))
    self.assertAllClose(x.numpy(), expected, rtol=1e-15, atol=0)

  @parameterized.parameters("paper", "lua_reference", "pytorch_reference")
  def test_entropy_sgd_outer_step(self, conventions):
    # One SGLD step on f = 1/2 a x^2 without noise, then the outer step.
    a, x0, lr, llr, gamma = 0.7, 1.3, 0.9, 0.1, 0.03
    x = tf.Variable(tf.constant([x0], tf.float64))
    optimizer = optimizers.EntropySGD(
        learning_rate=lr, num_langevin_steps=1, langevin_learning_rate=llr,
        gamma=gamma, scoping=1e-3, noise=0.0, alpha=0.75,
        conventions=conventions)
    optimizer.initialize([x])
    anchor_gradient = [a * x.read_value()]
    optimizer.begin_outer_step([x], anchor_gradient)
    optimizer.apply([a * x.read_value()], [x])
    optimizer.end_outer_step([x])
    c = optimizer.conventions
    g = gamma * (1 + 1e-3)**c.scoping_offset
    sample = x0 - llr * a * x0  # Coupling and momentum buffers start at 0.
    if c.inner_momentum:
      sample = x0 - llr * a * x0 * (1 + c.inner_momentum)  # Nesterov.
    weight = 0.75 if c.alpha_weights == "new_sample" else 0.25
    mean = x0 + weight * (sample - x0)
    direction = (g if c.outer_scale == "gamma" else 1.0) * (x0 - mean)
    if c.outer_momentum:  # Nesterov, buffer started at the anchor gradient.
      velocity = c.outer_momentum * a * x0 + direction
      direction += c.outer_momentum * velocity
    self.assertAllClose(x.numpy(), [x0 - lr * direction], rtol=1e-15, atol=0)


class AnchorGradientTest(tf.test.TestCase):

  def make(self):
    x = tf.Variable([1.0, 2.0])
    optimizer = optimizers.EntropySGD(num_langevin_steps=1, noise=0.0,
                                      conventions="pytorch_reference")
    optimizer.initialize([x])
    return x, optimizer

  def test_is_required(self):
    x, optimizer = self.make()
    with self.assertRaisesRegex(ValueError, "need the gradient at x"):
      optimizer.begin_outer_step([x])

  def test_starts_the_outer_velocity_only_at_the_first_step(self):
    x, optimizer = self.make()
    optimizer.begin_outer_step([x], [tf.constant([3.0, 4.0])])
    self.assertAllEqual(optimizer.outer_velocities[0], [3.0, 4.0])
    optimizer.apply([tf.constant([0.0, 0.0])], [x])
    optimizer.end_outer_step([x])
    velocity = optimizer.outer_velocities[0].numpy()
    optimizer.begin_outer_step([x], [tf.constant([30.0, 40.0])])
    self.assertAllEqual(optimizer.outer_velocities[0], velocity)

  def test_is_checked(self):
    x, optimizer = self.make()
    with self.assertRaisesRegex(ValueError, "has shape"):
      optimizer.begin_outer_step([x], [tf.constant([3.0])])

  def test_ignored_by_other_conventions(self):
    x = tf.Variable([1.0, 2.0])
    optimizer = optimizers.EntropySGD(conventions="lua_reference")
    optimizer.initialize([x])
    optimizer.begin_outer_step([x], [tf.constant([3.0, 4.0])])
    optimizer.begin_outer_step([x])
    self.assertFalse(optimizer.needs_anchor_gradient)


class OptimizerTestBase(tf.test.TestCase, parameterized.TestCase):
  """Behaviour every optimizer shares; subclasses say how to build one."""

  def make_optimizer(self, **kwargs):
    raise NotImplementedError

  def test_apply_before_initialize(self):
    x = tf.Variable([1.0])
    with self.assertRaisesRegex(RuntimeError, "initialize"):
      self.make_optimizer().apply([x * 1.0], [x])

  def test_length_mismatch(self):
    x, y = tf.Variable([1.0]), tf.Variable([2.0])
    optimizer = self.make_optimizer()
    optimizer.initialize([x, y])
    optimizer.begin_outer_step([x, y])
    with self.assertRaisesRegex(ValueError, "same length; got 1 updates for 2"):
      optimizer.apply([x * 1.0], [x, y])

  def test_different_parameters(self):
    x, y = tf.Variable([1.0]), tf.Variable([2.0, 3.0])
    optimizer = self.make_optimizer()
    optimizer.initialize([x])
    with self.assertRaisesRegex(ValueError, "do not match"):
      optimizer.apply([y * 1.0], [y])

  def test_empty_parameters(self):
    with self.assertRaisesRegex(ValueError, "cannot be empty"):
      self.make_optimizer().initialize([])

  def test_none_gradient(self):
    x = tf.Variable([1.0])
    optimizer = self.make_optimizer()
    optimizer.initialize([x])
    optimizer.begin_outer_step([x])
    with self.assertRaisesRegex(ValueError, "gradient of parameter .* is None"):
      optimizer.apply([None], [x])

  def test_dtype_mismatch(self):
    x = tf.Variable([1.0])
    optimizer = self.make_optimizer()
    optimizer.initialize([x])
    optimizer.begin_outer_step([x])
    with self.assertRaisesRegex(ValueError, "dtype float64, the parameter "
                                "float32"):
      optimizer.apply([tf.constant([1.0], tf.float64)], [x])

  def test_shape_mismatch(self):
    x = tf.Variable([1.0, 2.0])
    optimizer = self.make_optimizer()
    optimizer.initialize([x])
    optimizer.begin_outer_step([x])
    with self.assertRaisesRegex(ValueError, "has shape"):
      optimizer.apply([tf.constant([1.0, 2.0, 3.0])], [x])

  @parameterized.parameters(0.0, -0.1)
  def test_non_positive_learning_rate(self, learning_rate):
    with self.assertRaisesRegex(ValueError, "learning_rate must be > 0"):
      self.make_optimizer(learning_rate=learning_rate)

  def test_state_is_created_in_the_strategy_scope(self):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
      x = tf.Variable([1.0, 2.0])
      optimizer = self.make_optimizer()
      optimizer.initialize([x])
    for variable in optimizer.variables:
      self.assertTrue(strategy.extended.variable_created_in_scope(variable))

  def test_initialize_inside_the_replica_function_is_refused(self):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
      x = tf.Variable([1.0])
    optimizer = self.make_optimizer()
    with self.assertRaisesRegex(RuntimeError, "inside strategy.scope"):
      strategy.run(lambda: optimizer.initialize([x]))


class SGDTest(OptimizerTestBase):

  def make_optimizer(self, **kwargs):
    return optimizers.SGD(**{"learning_rate": 0.1, **kwargs})

  def test_nesterov_needs_momentum(self):
    with self.assertRaisesRegex(ValueError, "Nesterov momentum needs"):
      optimizers.SGD(0.1, nesterov=True)

  def test_bad_momentum(self):
    with self.assertRaisesRegex(ValueError, "momentum must be in"):
      optimizers.SGD(0.1, momentum=1.0)


class NesterovTest(OptimizerTestBase):

  def make_optimizer(self, **kwargs):
    return optimizers.SGD(**{"learning_rate": 0.1, "momentum": 0.9,
                             "nesterov": True, "weight_decay": 5e-4,
                             **kwargs})


def numpy_torch_adam(x, gradients, lr, beta1=0.9, beta2=0.999,
                     epsilon=1e-8, weight_decay=0.0):
  """Torch7 `optim.adam`, transcribed in float64: the iterates of x."""
  x = np.array(x, np.float64)
  m, v = np.zeros_like(x), np.zeros_like(x)
  iterates = []
  for t, g in enumerate(gradients, start=1):
    g = g(x) + weight_decay * x
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    denominator = np.sqrt(v) + epsilon
    step_size = lr * np.sqrt(1 - beta2**t) / (1 - beta1**t)
    x = x - step_size * m / denominator
    iterates.append(x.copy())
  return iterates


class AdamTest(OptimizerTestBase):

  def make_optimizer(self, **kwargs):
    return optimizers.Adam(**{"learning_rate": 1e-3, **kwargs})

  @parameterized.parameters(
      dict(weight_decay=0.0, epsilon=1e-8),
      dict(weight_decay=1e-2, epsilon=1e-8),
      # A large epsilon tells apart where it is added: to sqrt(v) (Torch)
      # or to sqrt(v / (1 - beta2^t)) (PyTorch).
      dict(weight_decay=0.0, epsilon=1e-1))
  def test_matches_torch_optim_adam(self, weight_decay, epsilon):
    x0 = np.array([1.0, -2.0, 0.5, 3.0])
    curvature = A_DIAG
    x = tf.Variable(x0, dtype=tf.float64)
    optimizer = optimizers.Adam(0.05, beta1=0.8, beta2=0.95, epsilon=epsilon,
                                weight_decay=weight_decay)
    optimizer.initialize([x])
    num_steps = 25
    ours = []
    for _ in range(num_steps):
      optimizer.begin_outer_step([x])
      optimizer.apply([curvature * x], [x])
      optimizer.end_outer_step([x])
      ours.append(x.numpy())
    expected = numpy_torch_adam(x0, [lambda y: curvature * y] * num_steps,
                                0.05, 0.8, 0.95, epsilon, weight_decay)
    self.assertAllClose(np.array(ours), np.array(expected), rtol=1e-12,
                        atol=1e-14)
    self.assertEqual(int(optimizer.step.numpy()), num_steps)

  def test_first_step_moves_each_coordinate_by_the_learning_rate(self):
    # Analytic: after bias correction m/sqrt(v) = sign(g) at t = 1, so every
    # coordinate moves by lr (up to epsilon), whatever its gradient's scale.
    x = tf.Variable([1.0, -1.0, 3.0], dtype=tf.float64)
    optimizer = optimizers.Adam(0.01, epsilon=1e-12)
    optimizer.initialize([x])
    optimizer.apply([tf.constant([1e-3, -5.0, 200.0], tf.float64)], [x])
    self.assertAllClose(x.numpy(), [0.99, -0.99, 2.99], atol=1e-9)

  def test_epsilon_placement_differs_from_pytorch(self):
    # With g = 1 at t = 1: Torch divides by sqrt(1 - beta2) + eps, PyTorch
    # by 1 + eps; the bias-corrected step differs by a factor we can state.
    x = tf.Variable([0.0], dtype=tf.float64)
    beta2, epsilon = 0.99, 0.1
    optimizer = optimizers.Adam(1.0, beta2=beta2, epsilon=epsilon)
    optimizer.initialize([x])
    optimizer.apply([tf.constant([1.0], tf.float64)], [x])
    root = np.sqrt(1 - beta2)
    torch_step = root / (root + epsilon)
    self.assertAllClose(-x.numpy(), [torch_step], rtol=1e-12)
    self.assertNotAllClose(-x.numpy(), [1.0 / (1.0 + epsilon)])

  @parameterized.parameters(dict(beta1=1.0), dict(beta2=-0.1),
                            dict(epsilon=0.0), dict(weight_decay=-1.0))
  def test_bad_hyperparameters(self, **kwargs):
    with self.assertRaises(ValueError):
      self.make_optimizer(**kwargs)


class EntropySGDTest(OptimizerTestBase):

  def make_optimizer(self, **kwargs):
    return optimizers.EntropySGD(**{"num_langevin_steps": 3, **kwargs})

  @parameterized.parameters(0, -1, 2.5, True, None)
  def test_bad_num_langevin_steps(self, value):
    with self.assertRaisesRegex(ValueError, r"num_langevin_steps \(L\) must "
                                "be an integer >= 1"):
      optimizers.EntropySGD(num_langevin_steps=value)

  @parameterized.parameters(0.0, -1e-3)
  def test_non_positive_langevin_learning_rate(self, value):
    with self.assertRaisesRegex(ValueError,
                                "langevin_learning_rate must be > 0"):
      optimizers.EntropySGD(langevin_learning_rate=value)

  @parameterized.parameters(
      dict(gamma=0.0), dict(scoping=-1.0), dict(noise=-1.0), dict(alpha=0.0),
      dict(alpha=1.5), dict(weight_decay=-1e-4))
  def test_bad_hyperparameters(self, **kwargs):
    with self.assertRaises(ValueError):
      optimizers.EntropySGD(**kwargs)

  def test_unknown_preset(self):
    with self.assertRaisesRegex(ValueError, "Unknown conventions preset"):
      optimizers.EntropySGD(conventions="torch")

  @parameterized.parameters(
      dict(alpha_weights="newest"), dict(noise_scale="sqrt"),
      dict(outer_scale="eta"), dict(inner_weight_decay="never"),
      dict(inner_momentum=1.0), dict(outer_momentum=-0.1),
      dict(scoping_offset=-1), dict(inner_momentum_buffer="velocity"),
      dict(outer_velocity_init="gradient"), dict(scoping_advances="yes"))
  def test_bad_conventions(self, **kwargs):
    with self.assertRaises(ValueError):
      optimizers.Conventions(**kwargs)

  def test_presets_differ_where_documented(self):
    paper, lua = optimizers.PAPER, optimizers.LUA_REFERENCE
    torch = optimizers.PYTORCH_REFERENCE
    self.assertEqual((paper.alpha_weights, lua.alpha_weights),
                     ("new_sample", "old_mean"))
    self.assertEqual((paper.noise_scale, lua.noise_scale),
                     ("sqrt_lr", "sqrt_2lr"))
    self.assertEqual((paper.outer_scale, lua.outer_scale), ("gamma", "one"))
    self.assertEqual((paper.scoping_offset, lua.scoping_offset), (0, 1))
    self.assertEqual(
        dataclasses.asdict(torch),
        dict(alpha_weights="old_mean", noise_scale="sqrt_2lr",
             outer_scale="one", inner_momentum=0.9, inner_nesterov=True,
             inner_weight_decay="before_momentum",
             inner_momentum_buffer="direction", outer_momentum=0.9,
             outer_nesterov=True, outer_weight_decay=True,
             outer_velocity_init="anchor_gradient", scoping_offset=0,
             scoping_advances=False))

  def test_momentum_state_only_when_used(self):
    x = tf.Variable([1.0])
    paper = optimizers.EntropySGD(conventions="paper")
    paper.initialize([x])
    lua = optimizers.EntropySGD(conventions="lua_reference")
    lua.initialize([x])
    self.assertEmpty(paper.inner_velocities)
    self.assertLen(lua.inner_velocities, 1)

  def test_noise_zero_draws_nothing(self):
    x = tf.Variable(tf.ones([3]))
    optimizer = optimizers.EntropySGD(noise=0.0)
    optimizer.initialize([x])

    @tf.function
    def step():
      optimizer.begin_outer_step([x])
      optimizer.apply([tf.ones([3])], [x])

    graph_def = step.get_concrete_function().graph.as_graph_def()
    op_types = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
      op_types |= {node.op for node in function.node_def}
    self.assertFalse({t for t in op_types if "Random" in t}, op_types)


del OptimizerTestBase  # Only its subclasses run.

if __name__ == "__main__":
  tf.test.main()
