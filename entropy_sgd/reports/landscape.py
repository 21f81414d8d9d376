"""Flatness of the training loss around a checkpoint: the driver.

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
directory and writes landscape.json, landscape.md and PNG plots. The
measures live in the analysis layer (`hessian`, `loss_landscape`,
`adaptive_flatness`), the report in `landscape_report`.
"""

import dataclasses
import json
import os
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import sonnet as snt
import tensorflow as tf

from entropy_sgd.analysis import adaptive_flatness
from entropy_sgd.analysis import hessian
from entropy_sgd.analysis import linear_algebra
from entropy_sgd.analysis import loss_landscape
from entropy_sgd.core import chrono
from entropy_sgd.core import train_step as train_step_lib
from entropy_sgd.train import config as config_lib
from entropy_sgd.train import run_dir as run_dir_lib
from entropy_sgd.workloads import data as data_lib
from entropy_sgd.workloads import models
from entropy_sgd.reports import landscape_report

MEASURES = ("eigenvalues", "trace", "density", "local_entropy",
            "sharpness", "adaptive_sharpness", "pac_bayes", "directions",
            "interpolation")


class LandscapeError(ValueError):
  """A run cannot be analysed; the message says why and what to do."""


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
  recalibration_augment: bool = _setting(
      True,
      "Recalibrate BatchNorm at x on --batches training batches augmented "
      "as the run was trained (its --augment); false: on the un-augmented "
      "batches f is measured on (the only choice before 2026-12-03).")
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
  config_path = os.path.join(run_dir, run_dir_lib.CONFIG_FILE)
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


def build_and_restore(config, checkpoint, strategy, data, flag):
  """The model of a run's `config` (float32) with `checkpoint`'s weights.

  Raises LandscapeError, naming `flag`, when the checkpoint does not hold
  that model's variables.
  """
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
  """(stage, {kind of pass: count}) of each stage that will run."""
  return [(stage.name, stage.passes(s)) for stage in _STAGES
          if stage.runs(s, has_compare)]


@dataclasses.dataclass
class _Run:
  """What the stages of `analyse` share."""
  settings: Settings
  config: config_lib.TrainConfig
  model: snt.Module
  objective: hessian.Objective
  recalibrate: hessian.BatchNormRecalibration
  progress: Progress
  data: data_lib.ImageData
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
  data = data_lib.ImageData(config_lib.pipeline_config(
      config, data_dir=s.data_dir or config.data_dir, batch_size=batch_size))
  num_batches = _num_batches(s, data, batch_size)
  try:
    os.makedirs(s.output_dir, exist_ok=True)
  except OSError as e:
    raise LandscapeError(f"--output_dir={s.output_dir}: cannot create it "
                         f"({e.strerror}).") from None
  model = build_and_restore(config, checkpoint, strategy, data, "--run_dir")
  if compare is not None:
    other = build_and_restore(*compare, strategy, data, "--compare")
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
  augmented = s.recalibration_augment and config.augment != "none"
  recalibrate = hessian.BatchNormRecalibration(model, hessian.Batches(
      strategy, lambda context: data.recalibration_dataset(
          0, context, augment=True), num_batches) if augmented else batches)
  recalibrate()
  progress = Progress(_plan(s, compare is not None))
  objective = hessian.Objective(
      hessian.classification_loss(model), model.trainable_variables, batches,
      method=s.hvp_method, on_pass=progress.on_pass)
  run = _Run(s, config, model, objective, recalibrate, progress, data,
             compare=compare)
  run.results.update(
      run_dir=s.run_dir, checkpoint=checkpoint, dataset=config.dataset,
      model=config.model, optimizer=config.opt,
      num_parameters=objective.num_parameters, batches=num_batches,
      batch_size=batch_size, examples=batches.num_examples,
      replicas=replicas, hvp_method=s.hvp_method, seed=s.seed,
      batch_norm_recalibration="augmented" if augmented else "un-augmented",
      measures=[m for m in MEASURES if m in s.measures])
  return run


def _loss_at_x(run: _Run):
  run.results["loss"], run.results["accuracy"] = (
      run.objective.loss_and_accuracy())


def heldout_split(config: config_lib.TrainConfig) -> str:
  """The split a run's generalisation is judged on: its clean validation
  split when it held one out, else the test split."""
  return "validation" if config.validation_examples else "test"


def heldout_batch_size(examples: int, batch_size: int, replicas: int) -> int:
  """A global batch size for one pass over `examples` held-out images.

  The largest size <= `batch_size`, divisible by `replicas`, that divides
  `examples`, so every image counts once in batches of one static shape;
  when that is below a quarter of `batch_size` (say, a prime count), the
  largest multiple of `replicas` <= min(batch_size, examples), and the
  tail is left out (the results say how many images counted).
  """
  limit = min(batch_size, examples)
  for size in range(limit - limit % replicas, 0, -replicas):
    if examples % size == 0:
      if 4 * size >= limit:
        return size
      break
  return max(replicas, limit - limit % replicas)


def _heldout_at_x(run: _Run):
  """Loss and accuracy over the held-out split at the statistics f sees.

  The BatchNorm statistics are the ones recalibrated for f, so the
  generalisation gap (held-out error - training error) compares two
  errors of one model; the summary's held-out accuracy was measured at
  the training loop's own recalibration.
  """
  data, strategy = run.data, run.objective.batches.strategy
  split = heldout_split(run.config)
  examples = data.num_examples(split)
  batch_size = heldout_batch_size(examples, run.objective.batches.num_examples
                                  // run.objective.batches.num_batches,
                                  strategy.num_replicas_in_sync)
  if examples < batch_size:
    logging.warning("landscape: the %s split's %d images are fewer than the "
                    "%d replicas; no held-out accuracy.", split, examples,
                    strategy.num_replicas_in_sync)
    return
  batches = hessian.Batches(
      strategy, lambda context: data.eval_dataset(split, context).unbatch(
      ).batch(context.get_per_replica_batch_size(batch_size),
              drop_remainder=True), examples // batch_size)
  objective = hessian.Objective(hessian.classification_loss(run.model),
                                run.model.trainable_variables, batches)
  loss, accuracy = objective.loss_and_accuracy()
  run.results.update(heldout_split=split, heldout_loss=loss,
                     heldout_accuracy=accuracy,
                     heldout_examples=batches.num_examples)


def _top_eigenvalues(run: _Run):
  s, objective = run.settings, run.objective
  if s.top_k == 1:
    power = linear_algebra.power_iteration(objective.hvp, run.start_vector(), 30,
                                    tolerance=1e-4)
    run.results.update(hessian_top_eigenvalues=[power.eigenvalue],
                       hessian_top_eigenvalue_residuals=[power.residual],
                       hessian_eigen_method="power_iteration",
                       hessian_eigen_iterations=power.iterations)
    return
  pairs = linear_algebra.top_eigenpairs(objective.hvp, objective.num_parameters,
                                 s.top_k, s.lanczos_iterations, s.seed,
                                 objective.dtype)
  run.results.update(hessian_top_eigenvalues=pairs.eigenvalues,
                     hessian_top_eigenvalue_residuals=pairs.residuals,
                     hessian_eigen_method="lanczos",
                     hessian_eigen_iterations=pairs.iterations)


def _trace(run: _Run):
  s, objective = run.settings, run.objective
  trace = linear_algebra.hutchinson_trace(objective.hvp, objective.num_parameters,
                                   s.probes, s.seed, objective.dtype)
  run.results.update(hessian_trace=trace.mean,
                     hessian_trace_stderr=trace.stderr,
                     hessian_trace_probes=s.probes)


def _density(run: _Run):
  s, objective = run.settings, run.objective
  n = objective.num_parameters
  quadrature = linear_algebra.slq(objective.hvp, n, s.density_probes,
                           s.density_iterations, s.seed + 1, objective.dtype)
  density = linear_algebra.spectral_density(
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
  run.plots["density"] = landscape_report.plot_density(
      density, run.results.get("hessian_top_eigenvalues", ()),
      run.output("hessian_density.png"), log_scale=s.density_log_scale)


def _local_entropy(run: _Run):
  s, objective = run.settings, run.objective
  if "hessian_top_eigenvalues" in run.results:  # SGLD steps need lambda_max.
    lambda_max = run.results["hessian_top_eigenvalues"][0]
  else:
    lambda_max = linear_algebra.power_iteration(objective.hvp, run.start_vector(),
                                         20).eigenvalue
  estimates = [loss_landscape.local_entropy(
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
  sharpness = loss_landscape.epsilon_sharpness(run.objective, s.epsilon, s.sharpness_steps,
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
  excluded = loss_landscape.excluded_from_directions(run.model, objective.parameters)
  first, second = (objective.flatten(loss_landscape.filter_normalized_direction(
      weights, excluded, rng)) for _ in range(2))
  alphas = np.linspace(-s.direction_range, s.direction_range,
                       s.direction_points)
  loss, accuracy = loss_landscape.loss_along_line(objective, first, alphas)
  run.results["direction_1d"] = {"alphas": alphas, "loss": loss,
                                 "accuracy": accuracy}
  plane = np.linspace(-s.direction_range, s.direction_range, s.plane_points)
  loss2, accuracy2 = loss_landscape.loss_on_plane(objective, first, second, plane, plane)
  run.results["direction_2d"] = {"alphas": plane, "betas": plane,
                                 "loss": loss2, "accuracy": accuracy2}
  run.plots["direction_1d"] = landscape_report.plot_curve(
      alphas, loss, accuracy, "filter-normalised direction: x + a d",
      run.output("direction_1d.png"))
  run.plots["direction_2d"] = landscape_report.plot_plane(plane, plane, loss2,
                                         run.output("direction_2d.png"))


def _interpolation(run: _Run):
  s, objective = run.settings, run.objective
  compare_config, compare_checkpoint, end = run.compare
  alphas = np.linspace(-0.5, 1.5, s.interpolation_points)
  with hessian.preserved_state(run.model, objective.batches.strategy):
    loss, accuracy = loss_landscape.interpolate(objective, objective.get_flat(), end,
                                 alphas, run.recalibrate)
  run.results["interpolation"] = {
      "compare_run_dir": s.compare_dir,
      "compare_checkpoint": compare_checkpoint,
      "compare_optimizer": compare_config.opt,
      "alphas": alphas, "loss": loss, "accuracy": accuracy}
  run.plots["interpolation"] = landscape_report.plot_curve(
      alphas, loss, accuracy,
      f"(1 - a) x_A + a x_B   (A: {run.config.opt}, B: {compare_config.opt})",
      run.output("interpolation.png"), marks=(0.0, 1.0))


# (stage name as in `_plan`, measure that asks for it, function).
@dataclasses.dataclass(frozen=True)
class _Stage:
  """One stage of `analyse`: its measure (None: always), what it does, and
  the passes over the batches it makes (by kind: loss, gradient, hvp),
  which price the ETA."""
  name: str
  measure: Optional[str]
  run: Callable[[_Run], None]
  passes: Callable[[Settings], Dict[str, int]]

  def runs(self, s: Settings, has_compare: bool) -> bool:
    if self.measure == "interpolation" and not has_compare:
      return False
    return self.measure is None or self.measure in s.measures


def _local_entropy_passes(s: Settings) -> Dict[str, int]:
  curvature_hvps = 0 if "eigenvalues" in s.measures else 20
  return {"hvp": curvature_hvps, "loss": len(s.entropy_gammas),
          "gradient": len(s.entropy_gammas) * s.entropy_chains *
                      s.entropy_betas * (s.entropy_steps + s.entropy_burn_in)}


_STAGES = (
    _Stage("loss at x", None, _loss_at_x, lambda s: {"loss": 1}),
    _Stage("held-out loss at x", None, _heldout_at_x, lambda s: {}),
    _Stage("top eigenvalues", "eigenvalues", _top_eigenvalues,
           lambda s: {"hvp": 30 if s.top_k == 1 else
                      max(s.top_k, s.lanczos_iterations)}),
    _Stage("trace", "trace", _trace, lambda s: {"hvp": s.probes}),
    _Stage("spectral density", "density", _density,
           lambda s: {"hvp": s.density_probes * s.density_iterations}),
    _Stage("local entropy", "local_entropy", _local_entropy,
           _local_entropy_passes),
    _Stage("epsilon-sharpness", "sharpness", _sharpness,
           lambda s: {"loss": 2, "gradient": s.sharpness_steps}),
    _Stage("adaptive sharpness", "adaptive_sharpness", _adaptive_sharpness,
           lambda s: {"loss": 2 + s.adaptive_samples,
                      "gradient": s.adaptive_steps}),
    _Stage("PAC-Bayes flatness", "pac_bayes", _pac_bayes,
           lambda s: {"loss": 1 + s.pac_bayes_samples *
                      s.pac_bayes_bisections}),
    _Stage("directions", "directions", _directions,
           lambda s: {"loss": s.direction_points + s.plane_points**2}),
    _Stage("interpolation", "interpolation", _interpolation,
           lambda s: {"loss": 2 * s.interpolation_points}),
)


def analyse(settings: Settings,
            strategy: Optional[tf.distribute.Strategy] = None) -> Dict:
  """Measures the run of `settings.run_dir` and writes the report.

  Returns the results written to landscape.json. Raises LandscapeError
  (and data.DataError) with one-line messages.
  """
  run = _load(settings, strategy or tf.distribute.get_strategy())
  for stage in _STAGES:
    if stage.runs(settings, run.compare is not None):
      run.progress.start(stage.name)
      stage.run(run)
      run.progress.finish()
  results = dict(run.results)
  results["plots"] = {k: os.path.basename(v) for k, v in run.plots.items()}
  results["seconds"] = dict(run.progress.stage_seconds)
  results = _json_ready(results)
  with open(run.output("landscape.json"), "w") as f:
    json.dump(results, f, indent=1, sort_keys=True)
  with open(run.output("landscape.md"), "w") as f:
    f.write(landscape_report.markdown_report(results))
  return results
