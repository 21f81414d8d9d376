"""A run's checkpoints: restoring the newest intact one, saving only finite
state, and naming the last good one when the run diverges."""

import os
from typing import Dict, Optional

from absl import logging
import numpy as np
import sonnet as snt
import tensorflow as tf

from entropy_sgd.train import cluster
from entropy_sgd.train import run_dir as run_dir_lib


class DivergenceError(RuntimeError):
  """The loss became NaN or Inf."""


def checkpoint_model_variables(run_dir: str) -> Dict[str, np.ndarray]:
  """The model variables of a run's latest checkpoint, by checkpoint key."""
  reader = tf.train.load_checkpoint(run_dir_lib.checkpoint_dir(run_dir))
  return {name: reader.get_tensor(name)
          for name in reader.get_variable_to_shape_map()
          if name.startswith("model/")}


def weights_checksum(model: snt.Module) -> float:
  """Sum of |w| over every model variable, in float64 (for comparisons)."""
  return float(sum(np.sum(np.abs(v.numpy()), dtype=np.float64)
                   for v in model.variables))


class Checkpoints:
  """A run's checkpoints: the newest intact one restored, only finite state
  saved, and the last good one named when the run diverges."""

  def __init__(self, trainer):
    """`trainer`: a `training.Trainer`, whose model and optimizer these
    checkpoints hold."""
    self._trainer = trainer
    extra_state = ({} if trainer.loss_scale is None
                   else {"loss_scale": trainer.loss_scale})
    self.checkpoint = tf.train.Checkpoint(
        model=trainer.model, optimizer=trainer.optimizer,
        best_accuracy=trainer.best_accuracy, **extra_state)
    self._saved_variables = [
        v for v in (list(trainer.model.variables) +
                    list(trainer.optimizer.variables) +
                    [trainer.best_accuracy])
        if v.dtype.is_floating]
    self._finite_flags = tf.function(lambda: tf.stack(  # One call, on device.
        [tf.reduce_all(tf.math.is_finite(v)) for v in self._saved_variables]))
    self.directory = run_dir_lib.checkpoint_dir(trainer.run_dir)
    # The chief's newest intact checkpoint; only the chief moves damaged
    # ones aside, before the manager reads the state file.
    self._resume_from = run_dir_lib.newest_intact_checkpoint(
        self.directory, repair=trainer.is_chief)
    self._manager = tf.train.CheckpointManager(
        self.checkpoint, self.directory if trainer.is_chief
        else cluster.scratch_checkpoint_dir(trainer.strategy),
        max_to_keep=trainer.config.keep_checkpoints)

  @property
  def resume_step(self) -> Optional[int]:
    return (None if self._resume_from is None
            else run_dir_lib.checkpoint_step(self._resume_from))

  def restore(self):
    if self._resume_from:
      self.checkpoint.restore(
          self._resume_from).assert_existing_objects_matched()
      logging.info("Resuming from %s (outer step %d).", self._resume_from,
                   self._trainer.step)

  def latest(self) -> Optional[str]:
    return tf.train.latest_checkpoint(self.directory)

  def saved_at(self, step: int) -> bool:
    latest = self.latest()
    return bool(latest) and latest.endswith(f"ckpt-{step}")

  def save(self, step: int) -> str:
    """Saves on every worker (collectives); only the chief's copy stays.

    Raises DivergenceError, and writes nothing, unless every variable of the
    checkpoint is finite: so the latest checkpoint, and every one rotation
    keeps, holds finite values only.
    """
    self._check_finite_state(step)
    try:
      path = self._manager.save(checkpoint_number=step)
    except (OSError, tf.errors.OpError) as e:
      raise run_dir_lib.checkpoint_write_error(
          self.directory, step, e) from None
    if self._trainer.is_chief:
      return path
    if tf.io.gfile.exists(self._manager.directory):
      tf.io.gfile.rmtree(self._manager.directory)
    return os.path.join(self.directory, os.path.basename(path))

  def _check_finite_state(self, step: int):
    finite = self._finite_flags().numpy()
    if finite.all():
      return
    names = [checkpoint_name(v) for v in self._saved_variables]
    bad = [name for name, ok in zip(names, finite) if not ok]
    self.diverged(step, f"{len(bad)} of the {len(names)} variables to be "
                  f"saved hold NaN or Inf (first: {bad[0]})")

  def diverged(self, step: int, what: str):
    """Raises DivergenceError naming the last good checkpoint, if any."""
    config = self._trainer.config
    kept = self.latest()
    epoch = max(0, step - 1) // self._trainer.steps_per_epoch + 1
    lower = "--lr" + (" or --langevin_lr" if config.opt == "entropy_sgd"
                      else "")
    if kept:
      advice = (f"the last good checkpoint ({kept}) is intact. Lower {lower} "
                f"and rerun with --allow_config_change: the run resumes from "
                f"that checkpoint.")
    else:
      advice = f"no checkpoint was written yet. Lower {lower} and rerun."
    raise DivergenceError(
        f"Training diverged at outer step {step} (epoch {epoch}): {what}. "
        f"Nothing was saved; {advice}")


def checkpoint_name(variable) -> str:
  return variable.name.split(":")[0]
