"""The one training loop every launcher shares.

`train(config)` builds the data, the Wide ResNet, the optimizer and the
compiled step, resumes from the run directory's latest checkpoint, trains,
evaluates every epoch, writes TensorBoard summaries and checkpoints, and
returns a summary. Bad settings, bad data and divergence raise errors whose
one-line messages say how to fix them; none of them touches a good
checkpoint.

Counting: an outer step consumes `L` minibatches (1 for SGD). An (outer)
epoch is `train_examples // batch_size` outer steps, so an Entropy-SGD epoch
is L passes over the data. The effective epoch is
gradient evaluations * batch_size / train_examples. TensorBoard's step axis
is the number of gradient evaluations, which compares optimizers fairly.

Distribution: each input pipeline (one per worker) reads its own shard of
the data in per-replica batches (`distribute_datasets_from_function`), so an
epoch shows every example once across workers; evaluation pads its last
batches (masked out of the sums) so that all shapes are static. Only the
chief writes checkpoints and summaries: other workers of a
MultiWorkerMirroredStrategy save to a temporary directory they delete at
once (saving takes part in collectives) and write no events.
"""

import dataclasses
import json
import math
import os
from typing import Dict, Optional

from absl import logging
import sonnet as snt
import tensorflow as tf

from entropy_sgd.analysis import hessian
from entropy_sgd.core import noise as noise_lib
from entropy_sgd.core import optimizers
from entropy_sgd.core import precision
from entropy_sgd.core import train_step as train_step_lib
from entropy_sgd.train import checkpoints as checkpoints_lib
from entropy_sgd.train import cluster
from entropy_sgd.train import config as config_lib
from entropy_sgd.train import evaluation
from entropy_sgd.train import preemption
from entropy_sgd.train import run_dir as run_dir_lib
from entropy_sgd.train import run_log
from entropy_sgd.train import run_record
from entropy_sgd.workloads import data as data_lib
from entropy_sgd.workloads import models

ConfigError = config_lib.ConfigError


def resolve_noise(config, strategy) -> noise_lib.Implementation:
  """What draws this run's Langevin noise under --noise_kernel, and why.

  Raises ConfigError, naming the fix, when --noise_kernel=on cannot be
  honoured here.
  """
  if config.opt != "entropy_sgd" or config.noise == 0:
    why = (f"--opt={config.opt}" if config.opt != "entropy_sgd"
           else "--noise=0")
    return noise_lib.Implementation(noise_lib.NONE,
                                    f"{why} draws no Langevin noise")
  try:
    return noise_lib.resolve(config.noise_kernel, jit_compile=config.jit,
                             strategy=strategy)
  except noise_lib.KernelUnavailableError as e:
    other = "drop --jit or " if config.jit else "or "
    raise ConfigError(
        f"--noise_kernel=on, but {e}; {other}pass --noise_kernel=off "
        f"(TensorFlow's ops: the same distribution, slower on CPUs).") from None


def make_optimizer(config, learning_rate: tf.Variable,
                   noise_implementation: Optional[noise_lib.Implementation]
                   = None) -> optimizers.Optimizer:
  """The optimizer of `config`; Entropy-SGD draws its noise with
  `noise_implementation` (None: `noise.standard_normal` decides)."""
  if config.opt == "entropy_sgd":
    extra = {}
    if config.parle:
      extra = dict(rho=config.rho, rho_scoping=config.rho_scoping)
    optimizer_class = optimizers.Parle if config.parle else (
        optimizers.EntropySGD)
    conventions = optimizers.PRESETS[config.conventions]
    if config.outer_weight_decay is not None:
      conventions = dataclasses.replace(
          conventions, outer_weight_decay=config.outer_weight_decay)
    optimizer = optimizer_class(
        **extra,
        learning_rate=learning_rate, num_langevin_steps=config.L,
        langevin_learning_rate=config.langevin_lr, gamma=config.gamma,
        scoping=config.scoping, noise=config.noise, alpha=config.alpha,
        weight_decay=config.weight_decay, conventions=conventions,
        seed=config.seed, jit_compile=config.jit)
    if noise_implementation is not None:
      optimizer.use_noise_kernel = noise_implementation.use_kernel
    return optimizer
  if config.opt == "sam":
    return optimizers.SAM(
        learning_rate, rho=config_lib.sam_rho(config),
        adaptive=config.sam_adaptive, eta=config.sam_eta,
        momentum=config.momentum, nesterov=config.momentum > 0,
        weight_decay=config.weight_decay,
        perturbation=config.sam_perturbation, jit_compile=config.jit)
  if config.opt == "adam":
    return optimizers.Adam(
        learning_rate, beta1=config.adam_beta1, beta2=config.adam_beta2,
        epsilon=config.adam_epsilon, weight_decay=config.weight_decay,
        jit_compile=config.jit)
  return optimizers.SGD(
      learning_rate, momentum=config.momentum,
      nesterov=config.opt == "nesterov", weight_decay=config.weight_decay,
      jit_compile=config.jit)


def _check_writable(run_dir):
  try:
    os.makedirs(run_dir, exist_ok=True)
    # Per process: workers of one run share the directory.
    probe = os.path.join(run_dir, f".write_probe.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(
        f"--log_dir: cannot write to {run_dir} ({e.strerror}); pass a "
        f"writable --log_dir.") from None


def _build_data(config, statistics_cache) -> data_lib.CifarData:
  return data_lib.CifarData(config_lib.pipeline_config(config),
                            statistics_cache)


def _build_model(config, strategy, image_shape) -> snt.Module:
  return train_step_lib.build_model(
      strategy, lambda: models.build(
          config.model, data_lib.num_classes(config.dataset),
          dropout=config.dropout,
          cross_replica_batch_norm=config.sync_batch_norm, seed=config.seed,
          compute_dtype=precision.compute_dtype(config.precision),
          init=config.init),
      image_shape)


def steps_until_boundary(config, step: int, total_steps: int,
                         steps_per_epoch: int) -> int:
  """Outer steps until the next loop boundary (at most --steps_per_loop).

  A call never crosses an epoch end (the learning rate changes there), a
  logging, evaluation or checkpoint step, or the end of the run.
  """
  boundaries = [step + config.steps_per_loop, total_steps,
                (step // steps_per_epoch + 1) * steps_per_epoch,
                (step // config.log_every_steps + 1) * config.log_every_steps]
  for every in (config.eval_every_steps, config.track_flatness_every_steps):
    if every:
      boundaries.append((step // every + 1) * every)
  boundaries += [decay_step for decay_step in (
      math.ceil(epoch * steps_per_epoch) for epoch in config.lr_decay_epochs)
                 if decay_step > step]
  return min(boundaries) - step


def _all_updates_skipped(loss_scale, optimizer, metrics,
                         num_steps: int) -> bool:
  """Whether float16 loss scaling skipped every update of the last call.

  Such a call has no loss (0/0). It is not divergence while the loss
  scale can still be halved: the overflow is the scale's, and the state
  is untouched. Once the scale has fallen to its floor of 1 the gradients
  overflow (nearly) unscaled, and the run has diverged.
  """
  if loss_scale is None:
    return False
  skipped = int(float(metrics["skipped_updates"]))
  if skipped < num_steps * optimizer.apply_calls_per_step:
    return False
  if loss_scale.at_minimum:
    return False
  logging.warning(
      "All %d updates of the last call overflowed in float16 and were "
      "skipped; the loss scale is now %g.", skipped,
      float(metrics["loss_scale"]))
  return True


class Trainer:
  """Everything one run needs, built (and restored) from a TrainConfig."""

  def __init__(self, config: config_lib.TrainConfig,
               statistics_cache: Optional[Dict] = None):
    """Builds the run of `config`; `statistics_cache`: see `data.ImageData`
    (one cache shared by several runs fits their normalisation once)."""
    config_lib.validate(config)
    config = dataclasses.replace(
        config, data_dir=run_dir_lib.resolve_user_path(config.data_dir),
        log_dir=run_dir_lib.resolve_user_path(config.log_dir))
    self.config = config
    self.run_dir = run_directory(config)
    # Before TensorFlow starts up:
    self.strategy = strategy = cluster.make_strategy(config)
    self.is_chief = cluster.is_chief(strategy)
    cluster.check_sync_batch_norm(config, strategy)
    self.noise_implementation = resolve_noise(config, strategy)
    if self.noise_implementation.name != noise_lib.NONE:
      logging.info("Langevin noise: %s (%s).",
                   run_record.NOISE_NAMES[self.noise_implementation.name],
                   self.noise_implementation.reason)
    cluster.check_batch_splits(config.batch_size, strategy.num_replicas_in_sync)
    if config.deterministic:
      tf.config.experimental.enable_op_determinism()
    tf.random.set_seed(config.seed)

    self.data = _build_data(config, statistics_cache)
    self.train_examples = self.data.num_examples("train")
    self.steps_per_epoch = self.train_examples // config.batch_size
    if self.steps_per_epoch < 1:
      raise ConfigError(
          f"--batch_size={config.batch_size} exceeds the "
          f"{self.train_examples} training examples; lower it.")
    self._lock = None
    if self.is_chief:  # Only now: a refused setting leaves no run directory.
      _check_writable(self.run_dir)
      self._lock = run_dir_lib.RunLock(self.run_dir)  # One process per run.
    try:
      self._build(config, strategy)
    except BaseException:
      self.release()  # A refused resume must not keep the directory locked.
      raise

  def _build(self, config, strategy):
    """Model, optimizer, step, checkpoints and restore (under the lock)."""
    self.total_steps = config.epochs * self.steps_per_epoch
    if config.max_steps is not None:
      self.total_steps = min(self.total_steps, config.max_steps)

    self.model = _build_model(config, strategy, self.data.image_shape)
    with strategy.scope():
      self.learning_rate = tf.Variable(config.lr, trainable=False, name="lr")
      self.best_accuracy = tf.Variable(0.0, trainable=False,
                                       name="best_accuracy")
      # float16 only: the loss scale and the count of skipped updates.
      self.loss_scale = (precision.DynamicLossScale()
                         if precision.uses_loss_scaling(config.precision)
                         else None)
    self.optimizer = make_optimizer(config, self.learning_rate,
                                    self.noise_implementation)
    # L for Entropy-SGD (L + 1 with the pytorch_reference conventions, whose
    # step also takes a gradient at x), 1 for SGD.
    self.evaluations_per_step = self.optimizer.gradient_evaluations_per_step
    self.train_step = train_step_lib.make_train_step(
        self.model, self.optimizer, strategy, config.batch_size,
        jit_compile=config.jit, loss_scale=self.loss_scale)
    self.checkpoints = checkpoints_lib.Checkpoints(self)
    self.config_record = run_record.config_record(
        config, self.run_dir, self.checkpoints.resume_step,
        self.noise_implementation)
    self.checkpoints.restore()
    cluster.check_workers_resumed_alike(strategy, self.step)
    self.evaluator = evaluation.Evaluator(self.model, strategy, self.data,
                                          config)
    self.flatness = (_flatness_tracker(self.model, strategy, self.data,
                                       config.seed)
                     if config.track_flatness_every_steps else None)

  def release(self):
    """Drops the run-directory lock (`run` does when it ends)."""
    if self._lock is not None:
      self._lock.release()
      self._lock = None

  @property
  def step(self) -> int:
    """Outer steps taken so far."""
    return int(self.optimizer.step.numpy())

  def effective_epoch(self, step: int) -> float:
    """Gradient evaluations * batch size / training examples."""
    return (step * self.evaluations_per_step * self.config.batch_size /
            self.train_examples)

  def _evaluate(self, splits, epoch: int) -> Dict[str, Dict[str, float]]:
    if self.config.opt == "entropy_sgd" and self.config.recalibrate_bn:
      self.evaluator.recalibrate_batch_norm(epoch)
    return {split: self.evaluator.evaluate(split) for split in splits}

  def run(self) -> Dict[str, float]:
    """Trains from the current step to the end; returns the summary.

    Raises `preemption.Preempted` after saving a checkpoint when SIGTERM or
    SIGINT arrives, and `checkpoints.DivergenceError` (saving nothing) on a
    non-finite loss or
    state.
    """
    try:
      with preemption.StopRequest() as stop:
        return self._run(stop)
    finally:
      self.release()

  def _run(self, stop: "preemption.StopRequest") -> Dict[str, float]:
    config, strategy = self.config, self.strategy
    step = self.step
    first_batch = step * self.optimizer.batches_per_step  # Global.
    iterator = iter(strategy.distribute_datasets_from_function(
        lambda context: self.data.train_dataset(context, first_batch)))
    eval_splits = ["test"] + (["validation"] if config.validation_examples
                              else [])
    log = run_log.RunLog(self)
    results = {}
    while step < self.total_steps:
      epoch = step // self.steps_per_epoch
      self.learning_rate.assign(config_lib.learning_rate_at(
          config, step / self.steps_per_epoch))
      num_steps = steps_until_boundary(config, step, self.total_steps,
                                       self.steps_per_epoch)
      metrics = self.train_step(iterator, num_steps)
      loss = float(metrics["loss"])
      step += num_steps
      log.after_call(step, num_steps)
      if not math.isfinite(loss) and not _all_updates_skipped(
          self.loss_scale, self.optimizer, metrics, num_steps):
        self.checkpoints.diverged(step, f"the training loss is {loss}")
      if step % config.log_every_steps == 0 or step == self.total_steps:
        log.progress(step, epoch, loss, metrics)

      if self.flatness and step % config.track_flatness_every_steps == 0:
        flatness = self.flatness.measure()  # At x; the model is restored.
        log.scalars(flatness, step)
        logging.info("flatness at step %d: %s", step, ", ".join(
            f"{k} {v:.4g}" for k, v in flatness.items()))

      if (step % self.steps_per_epoch == 0 or step == self.total_steps or
          (config.eval_every_steps and step % config.eval_every_steps == 0)):
        results = self._evaluate(eval_splits, epoch)
        for split in eval_splits:
          if not math.isfinite(results[split]["loss"]):
            self.checkpoints.diverged(step, f"the {split} loss is "
                           f"{results[split]['loss']}")
          log.scalars({f"{split}/loss": results[split]["loss"],
                       f"{split}/accuracy": results[split]["accuracy"]}, step)
        monitored = results.get("validation", results["test"])["accuracy"]
        self.best_accuracy.assign(
            max(float(self.best_accuracy.numpy()), monitored))
        path = self.checkpoints.save(step)
        logging.info(
            "evaluated at epoch %.2f (effective epoch %.2f): %s; checkpoint "
            "%s", step / self.steps_per_epoch, self.effective_epoch(step),
            ", ".join(f"{s} loss {r['loss']:.4f} accuracy "
                      f"{r['accuracy']:.4f}" for s, r in results.items()),
            path)
        log.flush()
      if step < self.total_steps and cluster.any_worker_stopped(
          strategy, stop.signal is not None):
        path = (self.checkpoints.latest() if self.checkpoints.saved_at(step)
                else self.checkpoints.save(step))
        log.flush()
        raise preemption.Preempted(
            f"stopped by {stop.name} after outer step {step} of "
            f"{self.total_steps}; checkpoint {path}. Rerun the same command "
            f"to resume.")

    if not results:  # Resumed at the end: evaluate what was saved.
      results = self._evaluate(eval_splits,
                               max(0, step - 1) // self.steps_per_epoch)
    summary = {
        "outer_steps": step,
        "effective_epochs": self.effective_epoch(step),
        "best_accuracy": float(self.best_accuracy.numpy()),
        "run_dir": self.run_dir,
    }
    for split, values in results.items():
      summary[f"final_{split}_accuracy"] = values["accuracy"]
      summary[f"final_{split}_loss"] = values["loss"]
    if self.is_chief and step >= self.config.epochs * self.steps_per_epoch:
      run_dir_lib.write_json(
          os.path.join(self.run_dir, run_dir_lib.SUMMARY_FILE), summary)
    # Identical on every replica and worker of a run; compare across them.
    logging.info("final weights checksum: %r",
                 checkpoints_lib.weights_checksum(self.model))
    logging.info("Finished: %s", ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
        for k, v in summary.items()))
    return summary


def _flatness_tracker(model, strategy, data, seed):
  """lambda_max and tr(H) on 2 fixed un-augmented training batches."""
  return hessian.FlatnessTracker(
      model, strategy, lambda context: data.recalibration_dataset(0, context),
      num_batches=2, iterations=10, seed=seed)


def run_directory(config: config_lib.TrainConfig) -> str:
  """Where `config` writes its checkpoints and events."""
  return os.path.join(run_dir_lib.resolve_user_path(config.log_dir),
                      config.run_name or config.default_run_name())


def finished_summary(config: config_lib.TrainConfig) -> Optional[Dict]:
  """The summary of the run of `config` if it ran its whole schedule."""
  path = os.path.join(run_directory(config), run_dir_lib.SUMMARY_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def train(config: config_lib.TrainConfig,
          statistics_cache: Optional[Dict] = None) -> Dict[str, float]:
  """Trains (or resumes) one run; returns the final summary."""
  return Trainer(config, statistics_cache).run()

