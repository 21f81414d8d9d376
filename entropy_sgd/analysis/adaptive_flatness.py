"""Flatness measures that survive reparametrisation.

Every measure here perturbs each weight relative to its own magnitude, so
scaling the weights that feed a BatchNorm layer (together with its
statistics: the same function) changes none of them, while the Hessian's
eigenvalues scale as 1/scale^2 (Dinh et al., "Sharp Minima Can Generalize
for Deep Nets", ICML 2017). They work on a `hessian.Objective` (f = mean
cross-entropy over fixed training batches, BatchNorm in inference mode;
`adaptive_flatness_test` checks the closed forms and the invariance):

* `adaptive_sharpness`: worst-case and average adaptive sharpness of
  Andriushchenko et al. ("A Modern Look at the Relationship between
  Sharpness and Generalization", ICML 2023, Eqs. 2-3, the element-wise
  |w| scaling of Kwon et al. 2021), in the max-norm:
      worst   = max_{|d_i| <= rho |w_i|} f(w + d) - f(w)   (projected ascent)
      average = E_{d_i ~ N(0, rho^2 w_i^2)} f(w + d) - f(w)  (Monte Carlo)
* `pac_bayes_flatness`: the magnitude-aware PAC-Bayes flatness of Jiang et
  al. ("Fantastic Generalization Measures and Where to Find Them", ICLR
  2020, Sec. C.3, "pacbayes.mag.flatness"): the largest sigma' such that
  perturbations u_i ~ N(0, sigma'^2 w_i^2 + eps^2) raise the training error
  by at most `max_error_increase` (Jiang et al.: 0.1) on average, found by
  bisection over Monte Carlo estimates; the measure is 1/sigma'^2.

BatchNorm's statistics are those `landscape` recalibrates once at w, held
fixed at every perturbed point (inference mode), not recalibrated there. For
a linear or convolution layer followed by BatchNorm this equals perturbing
the layer with BatchNorm folded into it (the fold multiplies a weight and
its perturbation by the same positive gamma/sigma), and it keeps the
measures about the weights the run found: recalibrating at each point would
let BatchNorm undo part of every perturbation, and would cost a pass per
point. BatchNorm's own scale and offset are perturbed like any weight.

Costs, in passes over the batches: worst-case `steps` gradient passes + 2
loss passes; average `samples` + 1 loss passes; PAC-Bayes `bisections` x
`samples` + 1 loss passes.
"""

import dataclasses
from typing import Callable, Optional

import numpy as np


@dataclasses.dataclass
class AdaptiveSharpness:
  rho: float
  worst_case: float  # max f(w + d) - f(w) over the box, by ascent.
  average: float  # Monte Carlo mean of f(w + d) - f(w).
  average_standard_error: float
  loss_at_w: float
  steps: int
  samples: int


def adaptive_sharpness(objective, rho: float = 0.05, steps: int = 10,
                       samples: int = 8, step_fraction: float = 0.25,
                       seed: int = 0,
                       callback: Optional[Callable[[], None]] = None
                       ) -> AdaptiveSharpness:
  """Worst-case and average adaptive sharpness at radius `rho`.

  The worst case is sought by projected sign-gradient ascent (steepest
  ascent in the box's own max-norm) from a random point of the box: a local
  ascent, so a lower bound of the true maximum, >= 0 since w is in the box.
  The average is over `samples` Gaussian draws; its standard error is the
  sample std / sqrt(samples).
  """
  w = objective.get_flat()
  scale = np.abs(w).astype(w.dtype)
  loss_at_w = objective.loss_and_accuracy()[0]
  rng = np.random.default_rng(seed)
  worst = box_maximum(objective, (rho * scale).astype(w.dtype), steps,
                      step_fraction, rng, start=1.0, loss_at_centre=loss_at_w,
                      callback=lambda step: _tick(callback))
  try:
    increases = []
    for _ in range(samples):
      noise = rng.standard_normal(w.size).astype(w.dtype)
      objective.set_flat(w + rho * scale * noise)
      increases.append(objective.loss_and_accuracy()[0] - loss_at_w)
      _tick(callback)
  finally:
    objective.set_flat(w)
  increases = np.array(increases, np.float64)
  error = (float(np.std(increases, ddof=1) / np.sqrt(samples))
           if samples > 1 else float("nan"))
  return AdaptiveSharpness(rho, float(worst - loss_at_w),
                           float(np.mean(increases)), error, float(loss_at_w),
                           steps, samples)


def box_maximum(objective, bound: np.ndarray, steps: int,
                step_fraction: float, rng: np.random.Generator,
                start: float = 1.0, loss_at_centre: Optional[float] = None,
                callback=None) -> float:
  """The largest f seen on the box |d_i| <= bound_i around the objective's
  current point, by projected sign-gradient ascent (steepest ascent in the
  box's own max-norm): d <- clip(d + step_fraction bound sign(grad f), +-
  bound), from d uniform in `start` times the box. A local ascent: a lower
  bound of the maximum, >= f at the centre (`loss_at_centre`, computed if
  not given). The point is restored."""
  x = objective.get_flat()
  d = (rng.uniform(-1, 1, x.size) * start * bound).astype(x.dtype)
  largest = (objective.loss_and_accuracy()[0] if loss_at_centre is None
             else loss_at_centre)
  try:
    for step in range(steps):
      objective.set_flat(x + d)
      loss, gradient = objective.loss_and_gradient()
      largest = max(largest, loss)
      d = np.clip(d + step_fraction * bound * np.sign(gradient), -bound,
                  bound)
      if callback is not None:
        callback(step + 1)
    objective.set_flat(x + d)
    largest = max(largest, objective.loss_and_accuracy()[0])
  finally:
    objective.set_flat(x)
  return largest


@dataclasses.dataclass
class PacBayesFlatness:
  sigma: float  # Largest sigma' found with mean error increase <= target.
  measure: float  # 1 / sigma'^2 (larger: sharper).
  max_error_increase: float
  epsilon: float
  error_at_w: float
  error_increase_at_sigma: float
  samples: int
  bisections: int


def pac_bayes_flatness(objective, max_error_increase: float = 0.1,
                       epsilon: float = 1e-3, samples: int = 8,
                       bisections: int = 10, sigma_range=(1e-4, 10.0),
                       seed: int = 0,
                       callback: Optional[Callable[[], None]] = None
                       ) -> PacBayesFlatness:
  """Magnitude-aware PAC-Bayes flatness (Jiang et al. 2020).

  Bisection in log sigma' over `sigma_range`: at each midpoint the mean
  training-error increase over `samples` draws of u (the same draws, common
  random numbers, at every sigma') decides the half. The error is
  1 - accuracy in [0, 1].
  """
  w = objective.get_flat()
  scale = np.abs(w).astype(np.float64)
  error_at_w = 1.0 - objective.loss_and_accuracy()[1]
  rng = np.random.default_rng(seed)
  draws = [rng.standard_normal(w.size) for _ in range(samples)]

  def increase(sigma):
    std = np.sqrt(sigma**2 * scale**2 + epsilon**2)
    errors = []
    for noise in draws:
      objective.set_flat((w + std * noise).astype(w.dtype))
      errors.append(1.0 - objective.loss_and_accuracy()[1])
      _tick(callback)
    return float(np.mean(errors) - error_at_w)

  low, high = np.log(sigma_range[0]), np.log(sigma_range[1])
  low_increase = None
  try:
    for _ in range(bisections):
      middle = 0.5 * (low + high)
      value = increase(float(np.exp(middle)))
      if value <= max_error_increase:
        low, low_increase = middle, value
      else:
        high = middle
  finally:
    objective.set_flat(w)
  sigma = float(np.exp(low))
  return PacBayesFlatness(
      sigma, 1.0 / sigma**2, max_error_increase, epsilon, float(error_at_w),
      float("nan") if low_increase is None else low_increase, samples,
      bisections)


def _tick(callback):
  if callback is not None:
    callback()
