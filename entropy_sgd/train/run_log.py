"""A run's TensorBoard events and its progress lines with images/s and ETA."""

import dataclasses
import math
import os
import time
from typing import Dict

from absl import logging
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

from entropy_sgd.core import chrono
from entropy_sgd.train import run_dir as run_dir_lib


class RunLog:
  """A run's TensorBoard events (the hparams summary, scalars on the
  gradient-evaluation axis) and its progress lines with images/s and ETA."""

  def __init__(self, trainer):
    """`trainer`: a `training.Trainer`, whose run this logs."""
    self._trainer = trainer
    config = trainer.config
    self._writer = (tf.summary.create_file_writer(trainer.run_dir)
                    if trainer.is_chief else tf.summary.create_noop_writer())
    with self._writer.as_default():
      hparams_api.hparams({k: (v if isinstance(v, (bool, int, float, str))
                               else str(v))
                           for k, v in dataclasses.asdict(config).items()})
    if trainer.is_chief:
      run_dir_lib.write_json(
          os.path.join(trainer.run_dir, run_dir_lib.CONFIG_FILE),
          trainer.config_record)
    strategy = trainer.strategy
    logging.info(
        "%s: %s on %s with %s, %d replica(s); %d outer steps per epoch, "
        "%d gradient evaluations per step; steps %d..%d; run dir %s%s",
        config.opt, config.model, config.dataset, type(strategy).__name__,
        strategy.num_replicas_in_sync, trainer.steps_per_epoch,
        trainer.evaluations_per_step, trainer.step, trainer.total_steps,
        trainer.run_dir, "" if trainer.is_chief else
        " (written by the chief only; this worker saves nothing)")
    self._eta = chrono.Eta(total=trainer.total_steps)
    self._window_start, self._window_steps = time.perf_counter(), 0
    self._hinted = False

  def scalars(self, values: Dict[str, float], step: int):
    with self._writer.as_default(
        step=step * self._trainer.evaluations_per_step):
      for name, value in values.items():
        tf.summary.scalar(name, value)

  def flush(self):
    self._writer.flush()

  def after_call(self, step: int, num_steps: int):
    if not self._eta.started:  # The first call includes tracing: not timed.
      self._eta.start(done=step)
    self._window_steps += num_steps

  def progress(self, step: int, epoch: int, loss: float, metrics):
    """Scalars and one log line for the steps since the last one."""
    trainer, config = self._trainer, self._trainer.config
    elapsed = time.perf_counter() - self._window_start
    images_per_second = (self._window_steps * trainer.evaluations_per_step *
                         config.batch_size / elapsed)
    remaining = self._eta.remaining(
        step, fallback_seconds_per_unit=elapsed / self._window_steps)
    scalars = {
        "train/loss": loss,
        "train/accuracy": float(metrics["accuracy"]),
        "optimizer/learning_rate": float(trainer.learning_rate.numpy()),
        "perf/images_per_second": images_per_second,
        "progress/effective_epoch": trainer.effective_epoch(step),
        "progress/outer_epoch": step / trainer.steps_per_epoch,
    }
    for name, tag in trainer.optimizer.diagnostics.items():
      scalars[tag] = float(metrics[name])
    if config.opt == "entropy_sgd":
      scalars["optimizer/langevin_learning_rate"] = config.langevin_lr
    if trainer.loss_scale is not None:
      scalars["precision/loss_scale"] = float(metrics["loss_scale"])
      scalars["precision/skipped_updates"] = float(
          trainer.loss_scale.skipped_updates.numpy())
      if not math.isfinite(loss):  # Every update of the call skipped.
        del scalars["train/loss"], scalars["train/accuracy"]
    self.scalars(scalars, step)
    logging.info(
        "epoch %d/%d (effective %.2f) step %d/%d: loss %.4f, accuracy "
        "%.4f, %.0f images/s, ETA %s", epoch + 1, config.epochs,
        trainer.effective_epoch(step), step, trainer.total_steps, loss,
        float(metrics["accuracy"]), images_per_second,
        chrono.format_duration(remaining))
    if not self._hinted and self._eta.seconds_per_unit(step) is not None:
      self._hinted = True
      hint_if_cpu_run_is_long(config, remaining)
    self._window_start, self._window_steps = time.perf_counter(), 0


def hint_if_cpu_run_is_long(config, remaining_seconds: float):
  """Logs once how to size a run for a CPU when one would take over a day."""
  if remaining_seconds < 24 * 3600 or (
      tf.config.list_logical_devices("GPU") or
      tf.config.list_logical_devices("TPU")):
    return
  logging.warning(
      "No GPU or TPU found and this run would take %s: the %s preset of "
      "--model=%s is sized for accelerators. For a CPU-sized run pass e.g. "
      "--model=wrn-16-1 --epochs=%d (or --max_steps=N), or train MNIST with "
      "//launch:mnist (README: 'Quick start', 'Results').",
      chrono.format_duration(remaining_seconds), config.opt, config.model,
      max(1, config.epochs // 10))
