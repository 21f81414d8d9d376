"""Flatness of the training loss around a checkpoint: the measures and a report.

Every measure looks at f, the mean cross-entropy over a fixed set of
training batches with BatchNorm in inference mode (see `hessian`), around
the weights x of a checkpoint:

* the Hessian's top eigenvalues, trace and spectral density (`hessian`);
* `local_entropy`: the local entropy of Chaudhari et al. (2017) at scope
  gamma and temperature T, by annealed SGLD and thermodynamic integration;
* `epsilon_sharpness`: Keskar et al. (2017), the largest relative loss
  increase in a box of size epsilon (|x| + 1) around x;
* `adaptive_flatness`: measures relative to each weight's magnitude, which
  rescaling into BatchNorm leaves unchanged: worst-case and average adaptive
  sharpness (Andriushchenko et al. 2023) and magnitude-aware PAC-Bayes
  flatness (Jiang et al. 2020);
* `loss_along_line` and `loss_on_plane`: f along filter-normalised random
  directions (Li et al., "Visualizing the Loss Landscape of Neural Nets",
  2018);
* `interpolate`: f on the straight line between two checkpoints.

`analyse(settings)` runs the measures a `Settings` asks for on a run
directory and writes landscape.json, landscape.md and PNG plots.
"""

import dataclasses
import json
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from absl import logging
from matplotlib.figure import Figure  # No pyplot: no global backend.
import numpy as np
import sonnet as snt
import tensorflow as tf

from entropy_sgd.analysis import adaptive_flatness
from entropy_sgd.analysis import hessian
from entropy_sgd.core import chrono
from entropy_sgd.core import noise as noise_lib
from entropy_sgd.core import train_step as train_step_lib
from entropy_sgd.train import config as config_lib
from entropy_sgd.train import run_dir as run_dir_lib
from entropy_sgd.workloads import data as data_lib
from entropy_sgd.workloads import models

MEASURES = ("eigenvalues", "trace", "density", "local_entropy",
            "sharpness", "adaptive_sharpness", "pac_bayes", "directions",
            "interpolation")


class LandscapeError(ValueError):
  """A run cannot be analysed; the message says why and what to do."""


# --------------------------------------------------------------- Directions.


def excluded_from_directions(model, parameters) -> List[bool]:
  """Which parameters get a zero direction: BatchNorm scales and offsets
  and every parameter of rank <= 1 (biases), as Li et al. do."""
  batch_norm = {v.ref() for bn in hessian.batch_norms(model)
                for v in bn.trainable_variables}
  return [p.ref() in batch_norm or len(p.shape) <= 1 for p in parameters]


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
    curvature = hessian.power_iteration(objective.hvp, start.astype(x.dtype),
                                        20).eigenvalue
  curvature = max(float(curvature), 0.0)
  nodes, weights = np.polynomial.legendre.leggauss(num_betas)
  betas, beta_weights = (nodes + 1) / 2, weights / 2
  step_sizes = step_fraction / (gamma + betas * curvature)
  mean_losses = np.zeros((chains, num_betas))

  def normal(chain, stage, step):
    key = noise_lib.step_key(seed, stage, step, stream=chain)
    return noise_lib.standard_normal(key, x.size, tf.as_dtype(
        x.dtype)).numpy()

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


# ------------------------------------------------------------------ Progress.


class Progress:
  """Logs progress and an ETA; work is counted in passes over the batches.

  `plan` lists (stage, {kind: passes}); the ETA prices the passes left at
  the seconds measured per kind so far (kinds not yet seen at a rough
  ratio: a gradient ~ 3 forward passes, a Hessian-vector product ~ 8).
  """

  _COST = {"loss": 1.0, "gradient": 3.0, "hvp": 8.0}

  def __init__(self, plan: Sequence[Tuple[str, Dict[str, int]]],
               interval_seconds: float = 10.0):
    self._plan = [(stage, dict(kinds)) for stage, kinds in plan]
    self._done = {stage: dict.fromkeys(kinds, 0) for stage, kinds in plan}
    self._seconds = {kind: [0.0, 0] for kind in self._COST}
    self._stage = None
    self._start = time.perf_counter()
    self._last_log = 0.0
    self._interval = interval_seconds
    self.stage_seconds = {}

  def start(self, stage: str):
    self._stage = stage
    self.stage_seconds[stage] = time.perf_counter()
    logging.info("landscape: %s ...", stage)

  def finish(self):
    stage = self._stage
    self.stage_seconds[stage] = time.perf_counter() - self.stage_seconds[
        stage]
    for kind, count in dict(self._plan)[stage].items():
      self._done[stage][kind] = count
    self._log(f"{stage} done in {chrono.format_duration(self.stage_seconds[stage])}")
    self._stage = None

  def on_pass(self, kind: str, seconds: float):
    total = self._seconds[kind]
    total[0] += seconds
    total[1] += 1
    if self._stage is not None:
      done = self._done[self._stage]
      done[kind] = done.get(kind, 0) + 1
    if (self._stage is not None and
        time.perf_counter() - self._last_log >= self._interval):
      planned = dict(self._plan)[self._stage]
      self._log(f"{self._stage}: " + ", ".join(
          f"{self._done[self._stage].get(k, 0)}/{n} {k} passes"
          for k, n in planned.items()))

  def _seconds_per(self, kind):
    seconds, count = self._seconds[kind]
    if count:
      return seconds / count
    rates = [s / c / self._COST[k] for k, (s, c) in self._seconds.items()
             if c]
    return self._COST[kind] * (np.mean(rates) if rates else 0.0)

  def remaining_seconds(self) -> float:
    remaining = 0.0
    for stage, kinds in self._plan:
      for kind, count in kinds.items():
        left = max(0, count - self._done[stage].get(kind, 0))
        remaining += left * self._seconds_per(kind)
    return remaining

  def _log(self, what):
    self._last_log = time.perf_counter()
    total = sum(n * self._COST[k] for _, kinds in self._plan
                for k, n in kinds.items())
    done = sum(min(self._done[s].get(k, 0), n) * self._COST[k]
               for s, kinds in self._plan for k, n in kinds.items())
    logging.info("landscape: %s; overall %.0f%%, elapsed %s, ETA %s", what,
                 100.0 * done / max(total, 1e-9),
                 chrono.format_duration(time.perf_counter() - self._start),
                 chrono.format_duration(self.remaining_seconds()))


# ------------------------------------------------------------------- Runs.


def _setting(default, help_text: str, flag: Optional[str] = None):
  """A Settings field; its help (and flag name) make //launch:landscape's
  flag."""
  metadata = {config_lib.HELP: help_text}
  if flag:
    metadata[config_lib.FLAG] = flag
  return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What `analyse` measures and how; see `//launch:landscape --help`."""
  run_dir: str = _setting(
      dataclasses.MISSING,
      "Run directory to analyse (holds config.json and "
      "checkpoints/); required.")
  output_dir: str = _setting(
      dataclasses.MISSING,
      "Directory for landscape.json, landscape.md and the "
      "plots; required.")
  compare_dir: Optional[str] = _setting(
      None,
      "A second run directory of the same model: adds the "
      "loss along the line from --run_dir's weights (a=0) to its weights "
      "(a=1), a in [-0.5, 1.5].", flag="compare")
  data_dir: Optional[str] = _setting(
      None,
      "Data directory; unset: the run's --data_dir.")
  batches: int = _setting(
      10,  # 0: every full batch of the training set.
      "Training batches f is averaged over; 0: "
      "every full batch of the training set.")
  batch_size: Optional[int] = _setting(
      None,  # None: the run's.
      "Global batch size; unset: the run's.")
  measures: Tuple[str, ...] = _setting(
      MEASURES,
      "Measures to compute, from " + ",".join(MEASURES) +
      " (interpolation needs --compare).")
  top_k: int = _setting(
      5,
      "Top Hessian eigenvalues (Lanczos; 1: power "
      "iteration).")
  lanczos_iterations: int = _setting(
      30,
      "Lanczos steps (Hessian-vector products) for the top eigenvalues.")
  probes: int = _setting(
      20,
      "Rademacher probes of Hutchinson's trace "
      "estimate.")
  density_probes: int = _setting(
      3,
      "Probes of stochastic Lanczos quadrature (spectral density).")
  density_iterations: int = _setting(
      40,
      "Lanczos steps per density probe.")
  density_sigma_fraction: float = _setting(
      0.01,
      "Gaussian broadening of the density, as a fraction of the spectrum's "
      "range.")
  density_log_scale: bool = _setting(
      True,
      "Plot the density on a log scale.")
  entropy_gammas: Tuple[float, ...] = _setting(
      (1.0,),
      "Scopes gamma of the local entropy (one estimate each).")
  entropy_temperature: float = _setting(
      1e-4,
      "Temperature T of the local entropy: x' spreads by sqrt(T/gamma) per "
      "weight.")
  entropy_betas: int = _setting(
      6,
      "Gauss-Legendre nodes of the thermodynamic integration.")
  entropy_steps: int = _setting(
      40,
      "SGLD steps averaged per node and chain.")
  entropy_burn_in: int = _setting(
      20,
      "SGLD steps discarded per node and chain.")
  entropy_chains: int = _setting(
      2,
      "Independent SGLD chains (standard error over them).")
  entropy_step_fraction: float = _setting(
      0.05,
      "SGLD step = this / (gamma + beta lambda_max).")
  epsilon: float = _setting(
      1e-3,
      "Box size of epsilon-sharpness: "
      "|y_i| <= epsilon (|x_i| + 1).")
  sharpness_steps: int = _setting(
      20,
      "Projected gradient-ascent steps of epsilon-sharpness.")
  adaptive_rho: float = _setting(
      0.05,
      "Adaptive sharpness radius: "
      "|d_i| <= rho |w_i| (worst case), d_i ~ N(0, rho^2 w_i^2) (average).")
  adaptive_steps: int = _setting(
      10,
      "Projected ascent steps of worst-case adaptive sharpness.")
  adaptive_samples: int = _setting(
      8,
      "Gaussian draws of average adaptive sharpness (its standard error).")
  pac_bayes_max_error_increase: float = _setting(
      0.1,
      "PAC-Bayes flatness: allowed mean training-error increase.")
  pac_bayes_epsilon: float = _setting(
      1e-3,
      "PAC-Bayes flatness: eps in u ~ N(0, sigma'^2 w^2 + eps^2).")
  pac_bayes_samples: int = _setting(
      8,
      "PAC-Bayes flatness: draws per bisection step.")
  pac_bayes_bisections: int = _setting(
      10,
      "PAC-Bayes flatness: bisection steps in log sigma'.")
  direction_points: int = _setting(
      21,
      "Points along the 1-D filter-normalised direction.")
  direction_range: float = _setting(
      1.0,
      "Directions are plotted for a (and b) in [-range, range].")
  plane_points: int = _setting(
      11,
      "Points per axis of the 2-D plot.")
  interpolation_points: int = _setting(
      21,
      "Points on the line between --run_dir and --compare.")
  hvp_method: str = _setting(
      "forward_over_backward",
      "Hessian-vector products by forward-over-backward or double backprop.")
  seed: int = _setting(
      0,
      "Seed of probes, directions and SGLD noise.")


def check_settings(s: Settings):
  """Raises LandscapeError naming the first invalid setting."""
  unknown = set(s.measures) - set(MEASURES)
  checks = [
      (not unknown, f"--measures: unknown {sorted(unknown)}; choose from "
       f"{','.join(MEASURES)}."),
      (s.batches >= 0, f"--batches must be >= 0 (0: the whole training "
       f"set); got {s.batches}."),
      (s.batch_size is None or s.batch_size >= 1,
       f"--batch_size must be >= 1; got {s.batch_size}."),
      (s.top_k >= 1, f"--top_k must be >= 1; got {s.top_k}."),
      (s.lanczos_iterations >= 1, f"--lanczos_iterations must be >= 1; got "
       f"{s.lanczos_iterations}."),
      (s.probes >= 2, f"--probes must be >= 2 (for a standard error); got "
       f"{s.probes}."),
      (s.density_probes >= 1 and s.density_iterations >= 1,
       "--density_probes and --density_iterations must be >= 1."),
      (s.density_sigma_fraction > 0, "--density_sigma_fraction must be > 0."),
      (bool(s.entropy_gammas) and all(g > 0 for g in s.entropy_gammas),
       f"--entropy_gammas must be positive; got {list(s.entropy_gammas)}."),
      (s.entropy_temperature > 0, "--entropy_temperature must be > 0."),
      (s.entropy_betas >= 1 and s.entropy_steps >= 1 and
       s.entropy_burn_in >= 0 and s.entropy_chains >= 1,
       "--entropy_betas, --entropy_steps and --entropy_chains must be >= 1 "
       "and --entropy_burn_in >= 0."),
      (0 < s.entropy_step_fraction < 2,
       "--entropy_step_fraction must be in (0, 2) (SGLD is stable below 2)."),
      (s.epsilon > 0, f"--epsilon must be > 0; got {s.epsilon}."),
      (s.sharpness_steps >= 1, "--sharpness_steps must be >= 1."),
      (s.adaptive_rho > 0, "--adaptive_rho must be > 0."),
      (s.adaptive_steps >= 1 and s.adaptive_samples >= 2,
       "--adaptive_steps must be >= 1 and --adaptive_samples >= 2."),
      (0 < s.pac_bayes_max_error_increase < 1,
       "--pac_bayes_max_error_increase must be in (0, 1)."),
      (s.pac_bayes_epsilon >= 0, "--pac_bayes_epsilon must be >= 0."),
      (s.pac_bayes_samples >= 1 and s.pac_bayes_bisections >= 1,
       "--pac_bayes_samples and --pac_bayes_bisections must be >= 1."),
      (s.direction_points >= 2 and s.plane_points >= 2 and
       s.interpolation_points >= 2,
       "--direction_points, --plane_points and --interpolation_points must "
       "be >= 2."),
      (s.direction_range > 0, "--direction_range must be > 0."),
      (s.hvp_method in hessian.HVP_METHODS,
       f"--hvp_method must be one of {', '.join(hessian.HVP_METHODS)}."),
  ]
  for ok, message in checks:
    if not ok:
      raise LandscapeError(message)


def read_run(run_dir: str, flag: str = "--run_dir"
             ) -> Tuple[config_lib.TrainConfig, str]:
  """(the run's TrainConfig, its latest checkpoint); LandscapeError else."""
  if not os.path.isdir(run_dir):
    raise LandscapeError(f"{flag}={run_dir}: no such directory.")
  config_path = os.path.join(run_dir, "config.json")
  if not os.path.exists(config_path):
    raise LandscapeError(
        f"{flag}={run_dir} is not a run directory (no config.json); pass a "
        f"directory that //launch:cifar10, cifar100 or mnist trained in.")
  try:
    values = run_dir_lib.decode_config(run_dir_lib.read_json(config_path),
                                       config_lib.FLOAT_FIELDS)
    known = {f.name for f in dataclasses.fields(config_lib.TrainConfig)}
    values = {k: v for k, v in values.items() if k in known}
    values["lr_decay_epochs"] = tuple(values.get("lr_decay_epochs", ()))
    config = config_lib.TrainConfig(**values)
    models.check_fits(config.model, config.dataset)
  except (OSError, ValueError, TypeError) as e:
    raise LandscapeError(f"{flag}={run_dir}: unreadable config.json "
                         f"({e}).") from None
  try:  # Reads, and never moves, the run's checkpoints.
    checkpoint = run_dir_lib.newest_intact_checkpoint(
        run_dir_lib.checkpoint_dir(run_dir), repair=False)
  except run_dir_lib.RunDirError as e:
    raise LandscapeError(f"{flag}={run_dir}: {e}") from None
  if checkpoint and checkpoint != run_dir_lib.listed_checkpoints(
      run_dir_lib.checkpoint_dir(run_dir))[0]:
    logging.warning("%s: the newest checkpoint is damaged; measuring %s, "
                    "the newest intact one.", run_dir, checkpoint)
  if not checkpoint:
    raise LandscapeError(
        f"{flag}={run_dir} has no checkpoint in {run_dir}/checkpoints "
        f"(training writes one at the end of every epoch and of the run).")
  return config, checkpoint


def _build_and_restore(config, checkpoint, strategy, data, flag):
  model = train_step_lib.build_model(
      strategy, lambda: models.build(
          config.model, data_lib.num_classes(config.dataset),
          dropout=config.dropout,
          cross_replica_batch_norm=config.sync_batch_norm, seed=config.seed),
      data.image_shape)
  try:
    status = tf.train.Checkpoint(model=model).restore(checkpoint)
    status.expect_partial()
    status.assert_existing_objects_matched()
  except (AssertionError, ValueError, tf.errors.OpError) as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise LandscapeError(
        f"{flag}: checkpoint {checkpoint} does not hold the variables of "
        f"--model={config.model} ({reason}).") from None
  return model


def _json_ready(value):
  if isinstance(value, dict):
    return {k: _json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_ready(v) for v in value]
  if isinstance(value, np.ndarray):
    return _json_ready(value.tolist())
  if isinstance(value, (np.floating, float)):
    value = float(value)
    return value if np.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def _plan(s: Settings, has_compare: bool):
  plan = [("loss at x", {"loss": 1})]
  if "eigenvalues" in s.measures:
    plan.append(("top eigenvalues", {"hvp": 30 if s.top_k == 1 else
                                     max(s.top_k, s.lanczos_iterations)}))
  if "trace" in s.measures:
    plan.append(("trace", {"hvp": s.probes}))
  if "density" in s.measures:
    plan.append(("spectral density",
                 {"hvp": s.density_probes * s.density_iterations}))
  if "local_entropy" in s.measures:
    curvature_hvps = 0 if "eigenvalues" in s.measures else 20
    plan.append(("local entropy", {
        "hvp": curvature_hvps,
        "loss": len(s.entropy_gammas),
        "gradient": len(s.entropy_gammas) * s.entropy_chains *
                    s.entropy_betas * (s.entropy_steps + s.entropy_burn_in)}))
  if "sharpness" in s.measures:
    plan.append(("epsilon-sharpness", {"loss": 2,
                                       "gradient": s.sharpness_steps}))
  if "adaptive_sharpness" in s.measures:
    plan.append(("adaptive sharpness", {
        "loss": 2 + s.adaptive_samples, "gradient": s.adaptive_steps}))
  if "pac_bayes" in s.measures:
    plan.append(("PAC-Bayes flatness", {
        "loss": 1 + s.pac_bayes_samples * s.pac_bayes_bisections}))
  if "directions" in s.measures:
    plan.append(("directions", {"loss": s.direction_points +
                                s.plane_points**2}))
  if "interpolation" in s.measures and has_compare:
    plan.append(("interpolation", {"loss": 2 * s.interpolation_points}))
  return plan


@dataclasses.dataclass
class _Run:
  """What the stages of `analyse` share."""
  settings: Settings
  config: config_lib.TrainConfig
  model: snt.Module
  objective: hessian.Objective
  recalibrate: hessian.BatchNormRecalibration
  progress: Progress
  results: Dict = dataclasses.field(default_factory=dict)
  plots: Dict = dataclasses.field(default_factory=dict)
  compare: Optional[Tuple[config_lib.TrainConfig, str, np.ndarray]] = None

  def start_vector(self) -> np.ndarray:
    rng = np.random.default_rng(self.settings.seed)
    return rng.standard_normal(self.objective.num_parameters).astype(
        self.objective.dtype)

  def output(self, name: str) -> str:
    return os.path.join(self.settings.output_dir, name)


def _check_compare(settings, config):
  """(config, checkpoint) of --compare, or None; LandscapeError if it is
  not a run of the same model on the same data."""
  if not settings.compare_dir:
    return None
  other, checkpoint = read_run(settings.compare_dir, "--compare")
  if (other.model.lower(), other.dataset) != (config.model.lower(),
                                              config.dataset):
    raise LandscapeError(
        f"--compare={settings.compare_dir} trains --model={other.model} on "
        f"{other.dataset}, --run_dir --model={config.model} on "
        f"{config.dataset}; interpolating needs the same model and data.")
  return other, checkpoint


def _num_batches(settings, data, batch_size):
  full_batches = data.steps_per_epoch
  if full_batches < 1:
    raise LandscapeError(f"--batch_size={batch_size} exceeds the "
                         f"{data.num_examples('train')} training examples.")
  if 0 < settings.batches <= full_batches:
    return settings.batches
  if settings.batches > full_batches:
    logging.warning("--batches=%d exceeds the %d full batches of the training "
                    "set; using %d.", settings.batches, full_batches,
                    full_batches)
  return full_batches


def _load(s: Settings, strategy) -> _Run:
  """Checks the runs, reads the data and builds the objective at x."""
  check_settings(s)
  config, checkpoint = read_run(s.run_dir)
  compare = _check_compare(s, config)
  batch_size = s.batch_size or config.batch_size
  replicas = strategy.num_replicas_in_sync
  if batch_size % replicas:
    raise LandscapeError(f"--batch_size={batch_size} is not divisible by the "
                         f"{replicas} replicas; use a multiple of {replicas}.")
  data = data_lib.ImageData(data_lib.PipelineConfig(
      dataset=config.dataset, data_dir=s.data_dir or config.data_dir,
      batch_size=batch_size, validation_examples=config.validation_examples,
      augment="none", seed=config.seed))
  num_batches = _num_batches(s, data, batch_size)
  try:
    os.makedirs(s.output_dir, exist_ok=True)
  except OSError as e:
    raise LandscapeError(f"--output_dir={s.output_dir}: cannot create it "
                         f"({e.strerror}).") from None
  model = _build_and_restore(config, checkpoint, strategy, data, "--run_dir")
  if compare is not None:
    other = _build_and_restore(*compare, strategy, data, "--compare")
    if ([tuple(v.shape) for v in model.trainable_variables] !=
        [tuple(v.shape) for v in other.trainable_variables]):
      raise LandscapeError(
          f"--compare={s.compare_dir}: its weights do not have the shapes of "
          f"--run_dir's; interpolating needs the same model.")
    compare = (*compare, np.concatenate(
        [np.ravel(v.numpy()) for v in other.trainable_variables]))

  logging.info("landscape: %s (%s on %s, checkpoint %s); %d batches of %d "
               "(%d examples), %d replica(s)", s.run_dir, config.model,
               config.dataset, checkpoint, num_batches, batch_size,
               num_batches * batch_size, replicas)
  batches = hessian.Batches(
      strategy, lambda context: data.recalibration_dataset(0, context),
      num_batches)
  recalibrate = hessian.BatchNormRecalibration(model, batches)
  recalibrate()
  progress = Progress(_plan(s, compare is not None))
  objective = hessian.Objective(
      hessian.classification_loss(model), model.trainable_variables, batches,
      method=s.hvp_method, on_pass=progress.on_pass)
  run = _Run(s, config, model, objective, recalibrate, progress,
             compare=compare)
  run.results.update(
      run_dir=s.run_dir, checkpoint=checkpoint, dataset=config.dataset,
      model=config.model, optimizer=config.opt,
      num_parameters=objective.num_parameters, batches=num_batches,
      batch_size=batch_size, examples=batches.num_examples,
      replicas=replicas, hvp_method=s.hvp_method, seed=s.seed,
      measures=[m for m in MEASURES if m in s.measures])
  return run


def _loss_at_x(run: _Run):
  run.results["loss"], run.results["accuracy"] = (
      run.objective.loss_and_accuracy())


def _top_eigenvalues(run: _Run):
  s, objective = run.settings, run.objective
  if s.top_k == 1:
    power = hessian.power_iteration(objective.hvp, run.start_vector(), 30,
                                    tolerance=1e-4)
    run.results.update(hessian_top_eigenvalues=[power.eigenvalue],
                       hessian_top_eigenvalue_residuals=[power.residual],
                       hessian_eigen_method="power_iteration",
                       hessian_eigen_iterations=power.iterations)
    return
  pairs = hessian.top_eigenpairs(objective.hvp, objective.num_parameters,
                                 s.top_k, s.lanczos_iterations, s.seed,
                                 objective.dtype)
  run.results.update(hessian_top_eigenvalues=pairs.eigenvalues,
                     hessian_top_eigenvalue_residuals=pairs.residuals,
                     hessian_eigen_method="lanczos",
                     hessian_eigen_iterations=pairs.iterations)


def _trace(run: _Run):
  s, objective = run.settings, run.objective
  trace = hessian.hutchinson_trace(objective.hvp, objective.num_parameters,
                                   s.probes, s.seed, objective.dtype)
  run.results.update(hessian_trace=trace.mean,
                     hessian_trace_stderr=trace.stderr,
                     hessian_trace_probes=s.probes)


def _density(run: _Run):
  s, objective = run.settings, run.objective
  n = objective.num_parameters
  quadrature = hessian.slq(objective.hvp, n, s.density_probes,
                           s.density_iterations, s.seed + 1, objective.dtype)
  density = hessian.spectral_density(
      quadrature, sigma_fraction=s.density_sigma_fraction)
  mean, mean_stderr = quadrature.moments(1)
  second, second_stderr = quadrature.moments(2)
  run.results["hessian_density"] = {
      "grid": density.grid, "density": density.density,
      "sigma": density.sigma, "probes": s.density_probes,
      "iterations": s.density_iterations, "nodes": quadrature.nodes,
      "weights": quadrature.weights, "trace_estimate": mean * n,
      "trace_estimate_stderr": mean_stderr * n, "second_moment": second,
      "second_moment_stderr": second_stderr}
  run.plots["density"] = plot_density(
      density, run.results.get("hessian_top_eigenvalues", ()),
      run.output("hessian_density.png"), log_scale=s.density_log_scale)


def _local_entropy(run: _Run):
  s, objective = run.settings, run.objective
  if "hessian_top_eigenvalues" in run.results:  # SGLD steps need lambda_max.
    lambda_max = run.results["hessian_top_eigenvalues"][0]
  else:
    lambda_max = hessian.power_iteration(objective.hvp, run.start_vector(),
                                         20).eigenvalue
  estimates = [local_entropy(
      objective, gamma, s.entropy_temperature, s.entropy_betas,
      s.entropy_steps, s.entropy_burn_in, s.entropy_chains,
      s.entropy_step_fraction, curvature=lambda_max, seed=s.seed + i)
               for i, gamma in enumerate(s.entropy_gammas)]
  first = estimates[0]
  run.results.update(
      local_entropy=first.value, local_entropy_stderr=first.stderr,
      local_entropy_deficit=first.deficit,
      local_entropy_deficit_stderr=first.deficit_stderr,
      local_entropy_gamma=first.gamma,
      local_entropy_temperature=first.temperature,
      local_entropy_by_gamma=[dataclasses.asdict(e) for e in estimates])


def _sharpness(run: _Run):
  s = run.settings
  sharpness = epsilon_sharpness(run.objective, s.epsilon, s.sharpness_steps,
                                seed=s.seed)
  run.results.update(epsilon_sharpness=sharpness.value,
                     epsilon_sharpness_epsilon=sharpness.epsilon,
                     epsilon_sharpness_max_loss=sharpness.max_loss,
                     epsilon_sharpness_steps=sharpness.steps)


def _adaptive_sharpness(run: _Run):
  s = run.settings
  result = adaptive_flatness.adaptive_sharpness(
      run.objective, rho=s.adaptive_rho, steps=s.adaptive_steps,
      samples=s.adaptive_samples, seed=s.seed)
  run.results.update(
      adaptive_sharpness_rho=result.rho,
      adaptive_sharpness_worst=result.worst_case,
      adaptive_sharpness_average=result.average,
      adaptive_sharpness_average_stderr=result.average_standard_error,
      adaptive_sharpness_steps=result.steps,
      adaptive_sharpness_samples=result.samples)


def _pac_bayes(run: _Run):
  s = run.settings
  result = adaptive_flatness.pac_bayes_flatness(
      run.objective, max_error_increase=s.pac_bayes_max_error_increase,
      epsilon=s.pac_bayes_epsilon, samples=s.pac_bayes_samples,
      bisections=s.pac_bayes_bisections, seed=s.seed)
  run.results.update(
      pac_bayes_sigma=result.sigma, pac_bayes_flatness=result.measure,
      pac_bayes_max_error_increase=result.max_error_increase,
      pac_bayes_epsilon=result.epsilon,
      pac_bayes_error_at_x=result.error_at_w,
      pac_bayes_error_increase_at_sigma=result.error_increase_at_sigma,
      pac_bayes_samples=result.samples,
      pac_bayes_bisections=result.bisections)


def _directions(run: _Run):
  s, objective = run.settings, run.objective
  rng = np.random.default_rng(s.seed)
  weights = [p.numpy() for p in objective.parameters]
  excluded = excluded_from_directions(run.model, objective.parameters)
  first, second = (objective.flatten(filter_normalized_direction(
      weights, excluded, rng)) for _ in range(2))
  alphas = np.linspace(-s.direction_range, s.direction_range,
                       s.direction_points)
  loss, accuracy = loss_along_line(objective, first, alphas)
  run.results["direction_1d"] = {"alphas": alphas, "loss": loss,
                                 "accuracy": accuracy}
  plane = np.linspace(-s.direction_range, s.direction_range, s.plane_points)
  loss2, accuracy2 = loss_on_plane(objective, first, second, plane, plane)
  run.results["direction_2d"] = {"alphas": plane, "betas": plane,
                                 "loss": loss2, "accuracy": accuracy2}
  run.plots["direction_1d"] = plot_curve(
      alphas, loss, accuracy, "filter-normalised direction: x + a d",
      run.output("direction_1d.png"))
  run.plots["direction_2d"] = plot_plane(plane, plane, loss2,
                                         run.output("direction_2d.png"))


def _interpolation(run: _Run):
  s, objective = run.settings, run.objective
  compare_config, compare_checkpoint, end = run.compare
  alphas = np.linspace(-0.5, 1.5, s.interpolation_points)
  with hessian.preserved_state(run.model, objective.batches.strategy):
    loss, accuracy = interpolate(objective, objective.get_flat(), end,
                                 alphas, run.recalibrate)
  run.results["interpolation"] = {
      "compare_run_dir": s.compare_dir,
      "compare_checkpoint": compare_checkpoint,
      "compare_optimizer": compare_config.opt,
      "alphas": alphas, "loss": loss, "accuracy": accuracy}
  run.plots["interpolation"] = plot_curve(
      alphas, loss, accuracy,
      f"(1 - a) x_A + a x_B   (A: {run.config.opt}, B: {compare_config.opt})",
      run.output("interpolation.png"), marks=(0.0, 1.0))


# (stage name as in `_plan`, measure that asks for it, function).
_STAGES = (
    ("loss at x", None, _loss_at_x),
    ("top eigenvalues", "eigenvalues", _top_eigenvalues),
    ("trace", "trace", _trace),
    ("spectral density", "density", _density),
    ("local entropy", "local_entropy", _local_entropy),
    ("epsilon-sharpness", "sharpness", _sharpness),
    ("adaptive sharpness", "adaptive_sharpness", _adaptive_sharpness),
    ("PAC-Bayes flatness", "pac_bayes", _pac_bayes),
    ("directions", "directions", _directions),
    ("interpolation", "interpolation", _interpolation),
)


def analyse(settings: Settings,
            strategy: Optional[tf.distribute.Strategy] = None) -> Dict:
  """Measures the run of `settings.run_dir` and writes the report.

  Returns the results written to landscape.json. Raises LandscapeError
  (and data.DataError) with one-line messages.
  """
  run = _load(settings, strategy or tf.distribute.get_strategy())
  for stage, measure, measure_fn in _STAGES:
    if measure is not None and measure not in settings.measures:
      continue
    if measure == "interpolation" and run.compare is None:
      continue
    run.progress.start(stage)
    measure_fn(run)
    run.progress.finish()
  results = dict(run.results)
  results["plots"] = {k: os.path.basename(v) for k, v in run.plots.items()}
  results["seconds"] = dict(run.progress.stage_seconds)
  results = _json_ready(results)
  with open(run.output("landscape.json"), "w") as f:
    json.dump(results, f, indent=1, sort_keys=True)
  with open(run.output("landscape.md"), "w") as f:
    f.write(markdown_report(results))
  return results


# ------------------------------------------------------------------- Report.


def plot_density(density: hessian.Density, top_eigenvalues, path: str,
                 log_scale: bool = True) -> str:
  figure = Figure(figsize=(6.5, 4.2))
  axis = figure.subplots()
  values = np.maximum(density.density, 1e-12) if log_scale else (
      density.density)
  axis.plot(density.grid, values, color="C0")
  for eigenvalue in top_eigenvalues:
    axis.axvline(eigenvalue, color="C3", alpha=0.4, linewidth=0.8)
  if log_scale:
    axis.set_yscale("log")
    axis.set_ylim(bottom=max(1e-9, values.max() * 1e-9))
  axis.set_xlabel("Hessian eigenvalue")
  axis.set_ylabel("density" + (" (log scale)" if log_scale else ""))
  axis.set_title(f"SLQ spectral density (Gaussian sigma {density.sigma:.3g})"
                 + ("; red: top eigenvalues" if len(top_eigenvalues) else ""),
                 fontsize=9)
  axis.grid(alpha=0.3)
  return _save(figure, path)


def plot_curve(alphas, loss, accuracy, title, path, marks=()) -> str:
  figure = Figure(figsize=(6.5, 4.2))
  axis = figure.subplots()
  axis.plot(alphas, loss, "o-", color="C0", markersize=3, label="loss")
  axis.set_xlabel("a")
  axis.set_ylabel("training loss", color="C0")
  other = axis.twinx()
  other.plot(alphas, accuracy, "s--", color="C1", markersize=3,
             label="accuracy")
  other.set_ylabel("training accuracy", color="C1")
  for mark in marks:
    axis.axvline(mark, color="grey", alpha=0.5, linewidth=0.8)
  axis.set_title(title, fontsize=9)
  axis.grid(alpha=0.3)
  return _save(figure, path)


def plot_plane(alphas, betas, loss, path) -> str:
  figure = Figure(figsize=(5.5, 4.6))
  axis = figure.subplots()
  contours = axis.contourf(alphas, betas, loss, levels=20, cmap="viridis")
  axis.contour(alphas, betas, loss, levels=20, colors="k", linewidths=0.3)
  figure.colorbar(contours, ax=axis, label="training loss")
  axis.plot([0], [0], "r+", markersize=10)
  axis.set_xlabel("a (direction 1)")
  axis.set_ylabel("b (direction 2)")
  axis.set_title("loss at x + a d1 + b d2 (filter-normalised)", fontsize=9)
  return _save(figure, path)


def _save(figure, path):
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  return path


def _number(value, digits=4):
  if value is None:
    return "n/a"
  return f"{value:.{digits}g}"


def markdown_report(results: Dict) -> str:
  """landscape.md: the scalar measures, what they mean, and the plots."""
  r = results
  lines = [
      f"# Loss landscape of {r['run_dir']}", "",
      f"{r['model']} on {r['dataset']} trained with {r['optimizer']}; "
      f"checkpoint `{r['checkpoint']}`. f = mean training cross-entropy "
      f"over {r['examples']} un-augmented training examples ({r['batches']} "
      f"batches of {r['batch_size']}), BatchNorm in inference mode with "
      f"statistics recalibrated on them, no weight decay; "
      f"{r['num_parameters']:,} parameters.", "",
      "| measure | value | meaning |", "|---|---|---|",
      f"| loss, accuracy at x | {_number(r['loss'])}, "
      f"{_number(r['accuracy'])} | on the examples above |"]
  if "hessian_top_eigenvalues" in r:
    values = ", ".join(_number(v) for v in r["hessian_top_eigenvalues"])
    lines.append(f"| top Hessian eigenvalues | {values} | "
                 f"{r['hessian_eigen_method']}, "
                 f"{r['hessian_eigen_iterations']} products; curvature of "
                 f"the sharpest directions |")
  if "hessian_trace" in r:
    lines.append(f"| Hessian trace | {_number(r['hessian_trace'])} ± "
                 f"{_number(r['hessian_trace_stderr'], 2)} | Hutchinson, "
                 f"{r['hessian_trace_probes']} Rademacher probes (± one "
                 f"standard error); total curvature |")
  if "local_entropy" in r:
    for e in r["local_entropy_by_gamma"]:
      lines.append(
          f"| local entropy Phi (gamma {_number(e['gamma'])}, T "
          f"{_number(e['temperature'])}) | {_number(e['value'], 6)} ± "
          f"{_number(e['stderr'], 2)}; deficit {_number(e['deficit'])} ± "
          f"{_number(e['deficit_stderr'], 2)} nats | higher Phi, smaller "
          f"deficit: a wider valley (deficit ~ 1/2 sum log(1 + "
          f"lambda/gamma)) |")
  if "epsilon_sharpness" in r:
    lines.append(f"| epsilon-sharpness (epsilon "
                 f"{_number(r['epsilon_sharpness_epsilon'])}) | "
                 f"{_number(r['epsilon_sharpness'])} % | largest loss "
                 f"increase in the box epsilon(abs(x) + 1), relative to "
                 f"1 + f(x) (Keskar et al.) |")
  if "adaptive_sharpness_worst" in r:
    lines.append(
        f"| adaptive sharpness (rho {_number(r['adaptive_sharpness_rho'])}) "
        f"| worst case {_number(r['adaptive_sharpness_worst'])}; average "
        f"{_number(r['adaptive_sharpness_average'])} ± "
        f"{_number(r['adaptive_sharpness_average_stderr'], 2)} | loss "
        f"increase for perturbations relative to abs(w): the box max by "
        f"{r['adaptive_sharpness_steps']} ascent steps, the Gaussian mean "
        f"over {r['adaptive_sharpness_samples']} draws (Andriushchenko et "
        f"al. 2023); invariant to rescaling into BatchNorm |")
  if "pac_bayes_sigma" in r:
    lines.append(
        f"| PAC-Bayes magnitude flatness | sigma' "
        f"{_number(r['pac_bayes_sigma'])}; 1/sigma'^2 "
        f"{_number(r['pac_bayes_flatness'])} | largest sigma' with "
        f"u ~ N(0, sigma'^2 w^2 + {_number(r['pac_bayes_epsilon'])}^2) "
        f"raising the training error by <= "
        f"{_number(r['pac_bayes_max_error_increase'])} on average (Jiang "
        f"et al. 2020); larger sigma': flatter |")
  if "interpolation" in r:
    i = r["interpolation"]
    barrier = max(i["loss"]) if i["loss"] else None
    inside = [l for a, l in zip(i["alphas"], i["loss"]) if 0 <= a <= 1]
    lines.append(f"| interpolation to {i['compare_run_dir']} "
                 f"({i['compare_optimizer']}) | max loss on [0, 1]: "
                 f"{_number(max(inside) if inside else barrier)} | a "
                 f"barrier between the two solutions if above both ends |")
  if r.get("plots"):
    lines += ["", "## Plots", ""]
  captions = {
      "density": "Hessian eigenvalue density (stochastic Lanczos "
                 "quadrature, Gaussian-broadened); mass near 0 and few "
                 "outliers mean a flat minimum.",
      "direction_1d": "Loss and accuracy along one filter-normalised "
                      "random direction (Li et al. 2018); a wide, flat "
                      "basin around a = 0 means a wide valley.",
      "direction_2d": "Loss on the plane of two filter-normalised random "
                      "directions; widely spaced contours around the "
                      "centre mean a flat minimum.",
      "interpolation": "Loss and accuracy on (1 - a) x_A + a x_B, BatchNorm "
                       "recalibrated at every point; a = 0 is this run, "
                       "a = 1 the --compare run.",
  }
  for name, file in r.get("plots", {}).items():
    lines += [f"![{name}]({file})", "", captions[name], ""]
  if "direction_1d" in r:
    lines += ["Directions: BatchNorm scales and offsets and biases are zero "
              "in the directions; BatchNorm statistics stay those at x.", ""]
  return "\n".join(lines) + "\n"
