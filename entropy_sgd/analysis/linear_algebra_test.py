"""Lanczos, power iteration, Hutchinson and SLQ against a known spectrum."""

from absl.testing import absltest
import numpy as np

from entropy_sgd.analysis import linear_algebra
from entropy_sgd.analysis import testing as analysis_testing


class SpectrumTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(3)
    self.top = np.array([10.0, 8.0, 6.5, 5.0, 4.2])
    self.spectrum = np.concatenate([self.top, rng.uniform(-1, 3, 195)])
    self.matrix = analysis_testing.random_symmetric(self.spectrum, seed=4)

  def test_lanczos_recovers_the_top_eigenpairs(self):
    pairs = linear_algebra.top_eigenpairs(lambda v: self.matrix @ v, 200, 5,
                                   num_iterations=80, dtype=np.float64)
    np.testing.assert_allclose(pairs.eigenvalues, self.top, rtol=1e-5)
    for value, vector, residual in zip(pairs.eigenvalues, pairs.eigenvectors,
                                       pairs.residuals):
      true_residual = np.linalg.norm(self.matrix @ vector - value * vector)
      self.assertLess(true_residual, 1e-4)
      self.assertLess(abs(true_residual - residual), 1e-6)
    np.testing.assert_allclose(pairs.eigenvectors @ pairs.eigenvectors.T,
                               np.eye(5), atol=1e-6)

  def test_lanczos_stops_on_an_invariant_subspace(self):
    matrix = np.diag([3.0, 3.0, 1.0, 1.0])  # Two distinct eigenvalues.
    pairs = linear_algebra.top_eigenpairs(lambda v: matrix @ v, 4, 2, 4,
                                   dtype=np.float64)
    self.assertEqual(pairs.iterations, 2)
    np.testing.assert_allclose(pairs.eigenvalues, [3.0, 1.0], rtol=1e-12)

  def test_power_iteration_finds_the_top_eigenvalue(self):
    start = np.random.default_rng(0).standard_normal(200)
    result = linear_algebra.power_iteration(lambda v: self.matrix @ v, start, 200,
                                     tolerance=1e-12)
    self.assertLess(result.iterations, 200)
    self.assertAlmostEqual(result.eigenvalue / 10.0, 1.0, delta=1e-5)
    self.assertLess(result.residual, 1e-3)

  def test_hutchinson_is_within_four_standard_errors(self):
    estimate = linear_algebra.hutchinson_trace(lambda v: self.matrix @ v, 200, 60,
                                        seed=1, dtype=np.float64)
    self.assertGreater(estimate.stderr, 0.0)
    self.assertLess(abs(estimate.mean - self.spectrum.sum()),
                    4 * estimate.stderr)
    # Its standard error is the analytic one, sqrt(2 sum_{i!=j} A_ij^2 / m),
    # within sampling error.
    off_diagonal = self.matrix - np.diag(np.diag(self.matrix))
    analytic = np.sqrt(2 * np.sum(off_diagonal**2) / 60)
    self.assertAlmostEqual(estimate.stderr / analytic, 1.0, delta=0.3)

  def test_slq_rules_integrate_polynomials_exactly(self):
    quadrature = linear_algebra.slq(lambda v: self.matrix @ v, 200, num_probes=1,
                             num_iterations=10, seed=2, dtype=np.float64)
    z = linear_algebra.rademacher(np.random.default_rng(2), 200, np.float64)
    v = z / np.linalg.norm(z)
    power = v
    for order in range(5):
      self.assertAlmostEqual(quadrature.moments(order)[0], v @ power,
                             places=9)
      power = self.matrix @ power

  def test_slq_density_has_the_spectrum_moments(self):
    quadrature = linear_algebra.slq(lambda v: self.matrix @ v, 200, num_probes=30,
                             num_iterations=30, seed=3, dtype=np.float64)
    np.testing.assert_allclose(quadrature.weights.sum(axis=1), 1.0,
                               rtol=1e-12)
    for order, exact in ((1, self.spectrum.mean()),
                         (2, np.mean(self.spectrum**2))):
      mean, stderr = quadrature.moments(order)
      self.assertLess(abs(mean - exact), 4 * stderr, (order, mean, exact))
    density = linear_algebra.spectral_density(quadrature, num_points=4000)
    step = density.grid[1] - density.grid[0]
    mass = density.density.sum() * step
    self.assertAlmostEqual(mass, 1.0, delta=1e-4)
    mean = np.sum(density.grid * density.density) * step
    self.assertAlmostEqual(mean, quadrature.moments(1)[0], delta=1e-4)
    second = np.sum(density.grid**2 * density.density) * step
    # Broadening adds sigma^2 to the second moment.
    self.assertAlmostEqual(second, quadrature.moments(2)[0] +
                           density.sigma**2, delta=1e-3)
    self.assertLess(density.grid[0], -1.0)
    self.assertGreater(density.grid[-1], 10.0)


if __name__ == "__main__":
  absltest.main()
