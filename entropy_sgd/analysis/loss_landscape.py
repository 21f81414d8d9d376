"""Measures of the training loss's landscape around weights x.

Each looks at an `hessian.Objective` f (the mean cross-entropy over fixed
training batches, BatchNorm in inference mode):

* `local_entropy`: the local entropy of Chaudhari et al. (2017) at scope
  gamma and temperature T, by annealed SGLD and thermodynamic integration;
* `epsilon_sharpness`: Keskar et al. (2017), the largest relative loss
  increase in a box of size epsilon (|x| + 1) around x;
* `loss_along_line` and `loss_on_plane`: f along filter-normalised random
  directions (Li et al., "Visualizing the Loss Landscape of Neural Nets",
  2018);
* `interpolate`: f on the straight line between two points.

The scale-aware measures are in `adaptive_flatness`, the Hessian's in
`hessian`; `entropy_sgd.reports.landscape` runs them on a checkpoint.
"""

import dataclasses
from typing import Callable, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from entropy_sgd.analysis import adaptive_flatness
from entropy_sgd.analysis import hessian
from entropy_sgd.analysis import linear_algebra
from entropy_sgd.core import batch_norm
from entropy_sgd.core import noise as noise_lib


# --------------------------------------------------------------- Directions.


def excluded_from_directions(model, parameters) -> List[bool]:
  """Which parameters get a zero direction: BatchNorm scales and offsets
  and every parameter of rank <= 1 (biases), as Li et al. do."""
  normalisation = {v.ref() for bn in batch_norm.batch_norms(model)
                   for v in bn.trainable_variables}
  return [p.ref() in normalisation or len(p.shape) <= 1 for p in parameters]


def filter_normalized_direction(weights: Sequence[np.ndarray],
                                excluded: Sequence[bool],
                                rng: np.random.Generator) -> List[np.ndarray]:
  """A Gaussian direction d with every filter rescaled to its weights' norm.

  A filter is one output unit: the slice [..., j] along the last axis (the
  output axis of Sonnet's Linear [in, out] and Conv2D [h, w, in, out]), so
  ||d[..., j]|| = ||x[..., j]||. Excluded parameters get zeros.
  """
  direction = []
  for w, skip in zip(weights, excluded):
    d = rng.standard_normal(w.shape).astype(w.dtype)
    if skip:
      direction.append(np.zeros_like(w))
      continue
    axes = tuple(range(w.ndim - 1))
    w_norm = np.sqrt(np.sum(np.square(w), axis=axes, keepdims=True))
    d_norm = np.sqrt(np.sum(np.square(d), axis=axes, keepdims=True))
    direction.append(d * w_norm / np.maximum(d_norm, np.finfo(w.dtype).tiny))
  return direction


def _evaluate_at(objective, points, callback=None, recalibrate=None):
  """(losses, accuracies) at each flat point; x is restored after.

  `recalibrate`, if given, runs at every point before the evaluation.
  """
  x = objective.get_flat()
  losses, accuracies = [], []
  try:
    for i, point in enumerate(points):
      objective.set_flat(point)
      if recalibrate is not None:
        recalibrate()
      loss, accuracy = objective.loss_and_accuracy()
      losses.append(loss)
      accuracies.append(accuracy)
      if callback is not None:
        callback(i + 1)
  finally:
    objective.set_flat(x)
  return np.array(losses), np.array(accuracies)


def loss_along_line(objective: hessian.Objective, direction: np.ndarray,
                    alphas: np.ndarray, callback=None):
  """(f(x + a d), accuracy) for each a in `alphas`; d flat."""
  x = objective.get_flat()
  return _evaluate_at(objective, (x + a * direction for a in alphas),
                      callback)


def loss_on_plane(objective: hessian.Objective, first: np.ndarray,
                  second: np.ndarray, alphas: np.ndarray, betas: np.ndarray,
                  callback=None):
  """(f, accuracy) at x + a d1 + b d2, as [len(betas), len(alphas)] grids."""
  x = objective.get_flat()
  points = (x + a * first + b * second for b in betas for a in alphas)
  losses, accuracies = _evaluate_at(objective, points, callback)
  shape = (len(betas), len(alphas))
  return losses.reshape(shape), accuracies.reshape(shape)


def interpolate(objective: hessian.Objective, start: np.ndarray,
                end: np.ndarray, alphas: np.ndarray,
                recalibrate: Optional[Callable[[], None]] = None,
                callback=None):
  """(f, accuracy) at (1 - a) start + a end, recalibrating BatchNorm at
  every point (neither end's statistics fit in between). The weights are
  restored afterwards, the statistics are the last point's: wrap the call
  in `hessian.preserved_state` to keep them too."""
  points = ((1 - alpha) * start + alpha * end for alpha in alphas)
  return _evaluate_at(objective, points, callback, recalibrate)


# ----------------------------------------------------------- Epsilon-sharpness.


@dataclasses.dataclass
class Sharpness:
  epsilon: float
  value: float  # Percent: 100 (max f - f(x)) / (1 + f(x)).
  loss_at_x: float
  max_loss: float  # Largest f seen in the box.
  steps: int


def epsilon_sharpness(objective: hessian.Objective, epsilon: float = 1e-3,
                      num_steps: int = 20, step_fraction: float = 0.2,
                      seed: int = 0, callback=None) -> Sharpness:
  """epsilon-sharpness of Keskar et al. (ICLR 2017), Metric 2.1 with A = I.

      100 (max_{y in C} f(x + y) - f(x)) / (1 + f(x)),
      C = {y : |y_i| <= epsilon (|x_i| + 1)}.

  The maximum is sought by projected sign-gradient ascent (steepest ascent
  in the max-norm, the box's own norm): y <- clip(y + step_fraction *
  b * sign(grad f(x + y)), -b, b), b = epsilon (|x| + 1), from a small
  random y (so that a stationary x is left). It is a local ascent, so the
  result is a lower bound of the true maximum, as Keskar et al.'s
  L-BFGS-B is; it is >= 0 since x itself is in C. For a separable convex
  f (e.g. a diagonal quadratic) it reaches the exact maximum.
  """
  x = objective.get_flat()
  loss_at_x = objective.loss_and_accuracy()[0]
  bound = (epsilon * (np.abs(x) + 1)).astype(x.dtype)
  max_loss = adaptive_flatness.box_maximum(
      objective, bound, num_steps, step_fraction, np.random.default_rng(seed),
      start=step_fraction, loss_at_centre=loss_at_x, callback=callback)
  value = 100.0 * (max_loss - loss_at_x) / (1.0 + loss_at_x)
  return Sharpness(epsilon, value, loss_at_x, max_loss, num_steps)


# ------------------------------------------------------------ Local entropy.


@dataclasses.dataclass
class LocalEntropy:
  """Estimates of Phi (see `local_entropy`) and how they were made."""
  gamma: float
  temperature: float
  value: float  # Phi(x; gamma, T), in units of f.
  stderr: float  # Over chains; NaN with one chain.
  loss_at_x: float
  deficit: float  # (-f(x) - Phi) / T: nats of volume lost to curvature.
  deficit_stderr: float
  betas: np.ndarray  # Gauss-Legendre nodes on [0, 1].
  beta_weights: np.ndarray
  mean_losses: np.ndarray  # [chains, betas]: estimates of E_beta[f].
  step_sizes: np.ndarray  # SGLD step per beta.
  steps: int
  burn_in: int


def local_entropy(objective: hessian.Objective, gamma: float,
                  temperature: float = 1.0, num_betas: int = 6,
                  steps: int = 100, burn_in: int = 50, chains: int = 2,
                  step_fraction: float = 0.05,
                  curvature: Optional[float] = None, seed: int = 0,
                  callback=None) -> LocalEntropy:
  """Local entropy (Chaudhari et al., 2017, eq. 3) at temperature T, by
  thermodynamic integration over annealed SGLD chains.

  Estimates, in units of f,

      Phi(x; gamma, T) = T log E_{x' ~ N(x, (T/gamma) I)} exp(-f(x') / T)
                       = F_T(x; gamma) - (n T / 2) log(2 pi T / gamma),

  where F_T(x; gamma) = T log int exp(-(f(x') + gamma/2 |x - x'|^2) / T) dx'
  is the paper's local entropy F(x; gamma) for T = 1, less the constant
  it takes for a flat f = 0. So Phi = -c for f = c constant, and near a
  minimum with Hessian H (Laplace) Phi ~ -f(x) - (T/2) sum_i log(1 +
  lambda_i / gamma): the `deficit` (-f(x) - Phi) / T ~ 1/2 sum_i log(1 +
  lambda_i / gamma) counts the nats of volume a valley lacks against a flat
  one at scope gamma; wide valleys have a small deficit.

  Estimator: with rho_beta(x') ~ exp(-(beta f(x') + gamma/2 |x - x'|^2)/T),
  d/dbeta (log Z_beta) = -E_beta[f] / T and rho_0 = N(x, (T/gamma) I), so

      Phi = -int_0^1 E_{rho_beta}[f(x')] dbeta,

  integrated by `num_betas`-point Gauss-Legendre quadrature. Each chain
  starts from an exact draw of rho_0 and visits the nodes in increasing
  beta (annealing); at each it runs `burn_in` + `steps` SGLD steps

      x' <- x' - eta (beta grad f(x') + gamma (x' - x)) + sqrt(2 eta T) xi,

  averaging f over the last `steps`, with eta = step_fraction / (gamma +
  beta curvature) (curvature: lambda_max, estimated by 20 power
  iterations when not given) and xi from `noise.standard_normal`. The
  standard error is over chains. Biases: SGLD's O(eta) discretisation (a
  mode of stiffness k = gamma + beta lambda gets variance T / (k (1 - eta
  k / 2)) instead of T / k: about step_fraction / 2 relative for the
  stiffest) and slow mixing: a mode relaxes at rate eta k per step, so
  modes with k below (gamma + beta curvature) / (step_fraction (burn_in +
  steps)) keep part of their rho_0 spread. BatchNorm statistics stay those
  recalibrated at x. Away from a minimum the tilted measure slides
  downhill and the deficit turns negative (about -|grad f(x)|^2 /
  (2 gamma T) to first order): it then measures descent, not width.
  """
  x = objective.get_flat()
  loss_at_x = objective.loss_and_accuracy()[0]
  if curvature is None:
    start = np.random.default_rng(seed).standard_normal(x.size)
    curvature = linear_algebra.power_iteration(objective.hvp, start.astype(x.dtype),
                                        20).eigenvalue
  curvature = max(float(curvature), 0.0)
  nodes, weights = np.polynomial.legendre.leggauss(num_betas)
  betas, beta_weights = (nodes + 1) / 2, weights / 2
  step_sizes = step_fraction / (gamma + betas * curvature)
  mean_losses = np.zeros((chains, num_betas))

  @tf.function  # One trace: eager key folding costs more than f here.
  def draw(chain, stage, step):
    key = noise_lib.step_key(seed, stage, step, stream=chain)
    return noise_lib.standard_normal(key, x.size, tf.as_dtype(x.dtype))

  def normal(chain, stage, step):
    return draw(*(tf.constant(i, tf.int64) for i in (chain, stage, step))
                ).numpy()

  done = 0
  try:
    for chain in range(chains):
      sample = x + np.sqrt(temperature / gamma) * normal(chain, 0, 0)
      for k, (beta, eta) in enumerate(zip(betas, step_sizes)):
        total = 0.0
        for step in range(burn_in + steps):
          objective.set_flat(sample)
          loss, gradient = objective.loss_and_gradient()
          if step >= burn_in:
            total += loss
          drift = beta * gradient + gamma * (sample - x)
          sample = (sample - eta * drift + np.sqrt(2 * eta * temperature) *
                    normal(chain, k + 1, step)).astype(x.dtype)
          done += 1
          if callback is not None:
            callback(done)
        mean_losses[chain, k] = total / steps
  finally:
    objective.set_flat(x)
  per_chain = -mean_losses @ beta_weights
  stderr = (per_chain.std(ddof=1) / np.sqrt(chains) if chains > 1
            else float("nan"))
  value = float(per_chain.mean())
  return LocalEntropy(
      gamma=gamma, temperature=temperature, value=value, stderr=float(stderr),
      loss_at_x=loss_at_x, deficit=(-loss_at_x - value) / temperature,
      deficit_stderr=float(stderr) / temperature, betas=betas,
      beta_weights=beta_weights, mean_losses=mean_losses,
      step_sizes=step_sizes, steps=steps, burn_in=burn_in)
