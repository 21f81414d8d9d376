"""Spectra of symmetric operators given only as `matvec(v) -> A v`, in NumPy.

Lanczos with full reorthogonalisation (`top_eigenpairs`), power iteration
(`power_iteration`), Hutchinson's trace estimator (`hutchinson_trace`) and
stochastic Lanczos quadrature (`slq`, `spectral_density`), as described by
Yao et al., "PyHessian: Neural Networks Through the Lens of the Hessian"
(2020), Ubaru et al. (2017) and Golub & Meurant (2010). Tridiagonal
matrices are diagonalised in float64. `hessian.Objective.hvp` is the
operator the flatness tools pass.

Memory: Lanczos keeps every basis vector (full reorthogonalisation), i.e.
iterations x dimension values in the vectors' dtype.
"""

import dataclasses
from typing import Callable, Optional, Tuple

import numpy as np

MatVec = Callable[[np.ndarray], np.ndarray]

# ----------------------------------------------------- Operators in NumPy.


def rademacher(rng: np.random.Generator, dim: int, dtype) -> np.ndarray:
  return (2 * rng.integers(0, 2, dim) - 1).astype(dtype)


@dataclasses.dataclass
class LanczosResult:
  """T = tridiag(betas, alphas, betas) and the orthonormal basis Q (rows)."""
  alphas: np.ndarray  # [m], float64
  betas: np.ndarray  # [m - 1], float64
  basis: np.ndarray  # [m, n]
  last_beta: float  # beta_m: the residual norm of the last step.


def lanczos(matvec: MatVec, start: np.ndarray, num_iterations: int,
            callback: Optional[Callable[[int, int], None]] = None
            ) -> LanczosResult:
  """`num_iterations` Lanczos steps with full reorthogonalisation.

  Each new vector is orthogonalised against every earlier one twice
  (classical Gram-Schmidt, "twice is enough"). Stops early when the Krylov
  space becomes invariant (then T's eigenvalues are exact eigenvalues).
  """
  dim = start.size
  num_iterations = min(num_iterations, dim)
  dtype = start.dtype
  basis = np.empty((num_iterations, dim), dtype)
  alphas, betas = [], []
  q = start / np.linalg.norm(start)
  last_beta = 0.0
  tolerance = 1e3 * np.finfo(dtype).eps
  for j in range(num_iterations):
    basis[j] = q
    w = matvec(q).astype(dtype, copy=False)
    scale = np.linalg.norm(w)
    alphas.append(float(np.dot(q.astype(np.float64), w.astype(np.float64))))
    for _ in range(2):
      w = w - basis[:j + 1].T @ (basis[:j + 1] @ w)
    last_beta = float(np.linalg.norm(w))
    if callback is not None:
      callback(j + 1, num_iterations)
    if j + 1 == num_iterations:
      break
    if last_beta <= tolerance * max(scale, np.finfo(dtype).tiny):
      basis = basis[:j + 1]
      last_beta = 0.0
      break
    betas.append(last_beta)
    q = w / last_beta
  return LanczosResult(np.array(alphas), np.array(betas), basis, last_beta)


def _tridiagonal_eigh(alphas, betas):
  matrix = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
  return np.linalg.eigh(matrix)


@dataclasses.dataclass
class Eigenpairs:
  """Ritz pairs, largest eigenvalue first."""
  eigenvalues: np.ndarray  # [k]
  eigenvectors: np.ndarray  # [k, n], unit norm
  residuals: np.ndarray  # [k]: ||H v - lambda v|| (a Lanczos bound).
  iterations: int


def top_eigenpairs(matvec: MatVec, dim: int, k: int, num_iterations: int,
                   seed: int = 0, dtype=np.float32,
                   callback: Optional[Callable[[int, int], None]] = None
                   ) -> Eigenpairs:
  """The k largest (algebraic) eigenvalues and their eigenvectors.

  Lanczos from a Gaussian start vector with full reorthogonalisation; the
  Ritz values of T approximate the extreme eigenvalues first. The residual
  of Ritz pair i is |beta_m s_{m,i}| (s_i the eigenvector of T), exact in
  exact arithmetic and free. `num_iterations` >= k; more converge better.
  """
  if not 1 <= k <= dim:
    raise ValueError(f"k must be in [1, {dim}]; got {k}")
  rng = np.random.default_rng(seed)
  start = rng.standard_normal(dim).astype(dtype)
  result = lanczos(matvec, start, max(k, num_iterations), callback)
  theta, s = _tridiagonal_eigh(result.alphas, result.betas)
  k = min(k, theta.size)
  order = np.argsort(theta)[::-1][:k]
  vectors = (s[:, order].T @ result.basis.astype(np.float64))
  vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
  residuals = np.abs(result.last_beta * s[-1, order])
  return Eigenpairs(theta[order], vectors.astype(dtype), residuals,
                    len(result.alphas))


@dataclasses.dataclass
class PowerResult:
  eigenvalue: float  # Rayleigh quotient v^T H v of the returned v.
  eigenvector: np.ndarray  # unit norm
  residual: float  # ||H v - lambda v||
  iterations: int


def power_iteration(matvec: MatVec, start: np.ndarray, num_iterations: int,
                    tolerance: float = 0.0,
                    callback: Optional[Callable[[int, int], None]] = None
                    ) -> PowerResult:
  """The dominant eigenpair: largest |lambda| (lambda_max near a minimum).

  v <- H v / ||H v|| from `start`; stops after `num_iterations` or when the
  Rayleigh quotient changes by at most `tolerance` relative. Each iteration
  is one product.
  """
  v = start / np.linalg.norm(start)
  eigenvalue, residual = np.nan, np.nan
  for i in range(num_iterations):
    w = matvec(v)
    previous, eigenvalue = eigenvalue, float(np.dot(v.astype(np.float64), w))
    residual = float(np.linalg.norm(w - eigenvalue * v))
    if callback is not None:
      callback(i + 1, num_iterations)
    converged = abs(eigenvalue - previous) <= tolerance * abs(eigenvalue)
    if i + 1 == num_iterations or converged:
      return PowerResult(eigenvalue, v, residual, i + 1)
    v = (w / np.linalg.norm(w)).astype(start.dtype)
  return PowerResult(eigenvalue, v, residual, num_iterations)


@dataclasses.dataclass
class TraceEstimate:
  mean: float  # Unbiased estimate of tr(H).
  stderr: float  # Standard error of the mean over the probes.
  samples: np.ndarray  # z^T H z per probe.


def hutchinson_trace(matvec: MatVec, dim: int, num_probes: int,
                     seed: int = 0, dtype=np.float32,
                     callback: Optional[Callable[[int, int], None]] = None
                     ) -> TraceEstimate:
  """tr(H) by Hutchinson's estimator (1990) with Rademacher probes.

  E[z^T H z] = tr(H) for z with independent +-1 entries; its variance,
  2 sum_{i != j} H_ij^2, is the least of any i.i.d. probe distribution.
  The standard error is the sample standard deviation / sqrt(probes).
  """
  if num_probes < 2:
    raise ValueError(f"num_probes must be >= 2 (for a standard error); got "
                     f"{num_probes}")
  rng = np.random.default_rng(seed)
  samples = []
  for i in range(num_probes):
    z = rademacher(rng, dim, dtype)
    samples.append(float(np.dot(z.astype(np.float64), matvec(z))))
    if callback is not None:
      callback(i + 1, num_probes)
  samples = np.array(samples)
  return TraceEstimate(float(samples.mean()),
                       float(samples.std(ddof=1) / np.sqrt(num_probes)),
                       samples)


@dataclasses.dataclass
class Quadrature:
  """Gauss quadrature of the spectral measure, one rule per probe.

  For a unit probe v, sum_j weights[p, j] g(nodes[p, j]) approximates
  v^T g(H) v = sum_i (v . u_i)^2 g(lambda_i), exactly for polynomials g of
  degree < 2m. Averaged over probes v = z/sqrt(n) (z Rademacher) it
  estimates (1/n) tr g(H) = the integral of g against the spectral density.
  Rules of probes that broke down early are padded with zero weights.
  """
  nodes: np.ndarray  # [probes, m]
  weights: np.ndarray  # [probes, m]; each row sums to 1.

  def moments(self, order: int) -> Tuple[float, float]:
    """(mean over probes of sum_j w_j theta_j^order, its standard error):
    estimates (1/n) tr(H^order)."""
    per_probe = np.sum(self.weights * self.nodes**order, axis=1)
    stderr = (per_probe.std(ddof=1) / np.sqrt(len(per_probe))
              if len(per_probe) > 1 else float("nan"))
    return float(per_probe.mean()), float(stderr)


def slq(matvec: MatVec, dim: int, num_probes: int, num_iterations: int,
        seed: int = 0, dtype=np.float32,
        callback: Optional[Callable[[int, int], None]] = None) -> Quadrature:
  """Stochastic Lanczos quadrature (Ubaru, Chen & Saad, 2017).

  For each probe v = z / sqrt(n) with Rademacher z, m Lanczos steps give
  T = S diag(theta) S^T; the nodes are theta and the weights (S_{1j})^2.
  """
  rng = np.random.default_rng(seed)
  nodes = np.zeros((num_probes, min(num_iterations, dim)))
  weights = np.zeros_like(nodes)
  for p in range(num_probes):
    z = rademacher(rng, dim, dtype)
    progress = None
    if callback is not None:
      progress = lambda j, m, p=p: callback(p * m + j, num_probes * m)
    result = lanczos(matvec, z, num_iterations, progress)
    theta, s = _tridiagonal_eigh(result.alphas, result.betas)
    nodes[p, :theta.size] = theta
    nodes[p, theta.size:] = theta[-1]
    weights[p, :theta.size] = s[0]**2
  return Quadrature(nodes, weights)


@dataclasses.dataclass
class Density:
  grid: np.ndarray
  density: np.ndarray  # Integrates to ~1 over the grid.
  sigma: float  # Standard deviation of the Gaussian broadening.


def spectral_density(quadrature: Quadrature, num_points: int = 1000,
                     sigma: Optional[float] = None,
                     sigma_fraction: float = 0.01,
                     margin: float = 0.05) -> Density:
  """Gaussian-broadened eigenvalue density from SLQ rules.

  phi(t) = (1/P) sum_p sum_j w_pj N(t; theta_pj, sigma^2): a density of
  total mass 1 whose moments converge to those of the spectrum. sigma
  defaults to sigma_fraction x (largest - smallest node); the grid covers
  the nodes plus `margin` of that range and 4 sigma on each side.
  """
  low, high = float(quadrature.nodes.min()), float(quadrature.nodes.max())
  spread = max(high - low, 1e-12 * max(1.0, abs(high)))
  sigma = sigma if sigma is not None else sigma_fraction * spread
  pad = margin * spread + 4 * sigma
  grid = np.linspace(low - pad, high + pad, num_points)
  density = np.zeros(num_points)
  for theta, w in zip(quadrature.nodes, quadrature.weights):
    gaussians = np.exp(-0.5 * ((grid[:, None] - theta[None, :]) / sigma)**2)
    density += gaussians @ w
  density /= quadrature.nodes.shape[0] * sigma * np.sqrt(2 * np.pi)
  return Density(grid, density, sigma)
