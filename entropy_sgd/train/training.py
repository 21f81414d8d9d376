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
import signal
import tempfile
import threading
import time
from typing import Dict, Optional

from absl import logging
import numpy as np
import sonnet as snt
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

from entropy_sgd.analysis import hessian
from entropy_sgd.core import batch_norm
from entropy_sgd.core import chrono
from entropy_sgd.core import distribution
from entropy_sgd.core import noise as noise_lib
from entropy_sgd.core import optimizers
from entropy_sgd.core import precision
from entropy_sgd.core import train_step as train_step_lib
from entropy_sgd.train import config as config_lib
from entropy_sgd.train import run_dir as run_dir_lib
from entropy_sgd.workloads import data as data_lib
from entropy_sgd.workloads import models

ConfigError = config_lib.ConfigError


class DivergenceError(RuntimeError):
  """The loss became NaN or Inf."""


def _check_tf_config():
  """Raises ConfigError unless TF_CONFIG names a cluster and this worker."""
  example = ('{"cluster": {"worker": ["host1:port", "host2:port"]}, '
             '"task": {"type": "worker", "index": 0}}')
  raw = os.environ.get("TF_CONFIG")
  if not raw:
    raise ConfigError(
        f"--strategy=multi_worker needs the TF_CONFIG environment variable, "
        f"e.g. {example} (docs/scaling_out.md).")
  try:
    tf_config = json.loads(raw)
    cluster, task = tf_config["cluster"], tf_config["task"]
    task_type, index = task["type"], int(task["index"])
    if task_type not in ("chief", "worker"):
      raise ValueError(f"task type {task_type!r} is not chief or worker")
    if not 0 <= index < len(cluster[task_type]):
      raise ValueError(f"task index {index} is outside cluster "
                       f"{task_type!r}")
  except (ValueError, KeyError, TypeError) as e:
    reason = f"missing {e}" if isinstance(e, KeyError) else str(e)
    raise ConfigError(
        f"--strategy=multi_worker: invalid TF_CONFIG ({reason}); expected "
        f"e.g. {example}.") from None


def _tpu_strategy(tpu: str) -> tf.distribute.Strategy:
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
  except (ValueError, RuntimeError, OSError, tf.errors.OpError) as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise ConfigError(
        f"--strategy=tpu: no TPU found with --tpu={tpu!r} ({reason}); pass "
        f"--tpu=NAME or --tpu=grpc://HOST:8470, or run on a Cloud TPU VM."
    ) from None
  return tf.distribute.TPUStrategy(resolver)


def make_strategy(config: config_lib.TrainConfig) -> tf.distribute.Strategy:
  """The strategy of --strategy; call it before TensorFlow starts up.

  default: one device. mirrored: MirroredStrategy over all local GPUs, else
  --num_devices logical CPUs. multi_worker: MultiWorkerMirroredStrategy over
  the workers of TF_CONFIG (all GPUs of each worker, else its CPU). tpu:
  TPUStrategy on the TPU of --tpu.
  """
  if config.strategy == "default":
    return tf.distribute.get_strategy()
  if config.strategy == "multi_worker":
    _check_tf_config()
    return tf.distribute.MultiWorkerMirroredStrategy()
  if config.strategy == "tpu":
    return _tpu_strategy(config.tpu)
  if tf.config.list_physical_devices("GPU"):  # Does not start TF up.
    return tf.distribute.MirroredStrategy()
  cpus = distribution.logical_cpus(config.num_devices)
  if len(cpus) < config.num_devices:
    raise ConfigError(
        f"--strategy=mirrored wants --num_devices={config.num_devices} CPU "
        f"devices but only {len(cpus)} exist; TensorFlow was initialised "
        f"before the launcher could create them.")
  return tf.distribute.MirroredStrategy(cpus)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes checkpoints and summaries.

  Every process is the chief except the workers of a
  MultiWorkerMirroredStrategy other than "chief" (or worker 0 when the
  cluster has no chief).
  """
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return True
  resolver = strategy.cluster_resolver
  task_type, task_id = resolver.task_type, resolver.task_id
  return (task_type in (None, "chief") or
          (task_type == "worker" and task_id == 0 and
           "chief" not in resolver.cluster_spec().as_dict()))


def _scratch_checkpoint_dir(strategy) -> str:
  """Where a non-chief worker saves (and at once deletes) its checkpoints."""
  resolver = strategy.cluster_resolver
  return os.path.join(
      tempfile.gettempdir(), f"entropy_sgd_{resolver.task_type}"
      f"{resolver.task_id}_{os.getpid()}_checkpoints")


def _check_sync_batch_norm(config, strategy):
  if (config.sync_batch_norm and config.jit and
      config.strategy in ("mirrored", "multi_worker") and
      strategy.num_replicas_in_sync > 1 and
      not all("GPU" in device.upper()
              for device in strategy.extended.worker_devices)):
    raise ConfigError(
        f"--sync_batch_norm with --jit needs GPUs under --strategy="
        f"{config.strategy}: on CPUs TensorFlow cannot all-reduce inside an "
        f"XLA-compiled replica step; drop --jit or --sync_batch_norm.")


def _check_workers_resumed_alike(strategy, step: int):
  """Raises ConfigError unless every worker starts from outer step `step`.

  A worker that cannot read the chief's checkpoints would start from scratch
  while the chief resumes, and the replicas would silently disagree. All
  workers reach the same verdict: the steps s_i are equal exactly when
  n * sum(s_i^2) = (sum s_i)^2.
  """
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return
  local = tf.constant([step, step * step], tf.float64)
  total, total_of_squares = strategy.reduce(
      tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.identity(local)),
      axis=None).numpy()
  if strategy.num_replicas_in_sync * total_of_squares != total**2:
    raise ConfigError(
        "--strategy=multi_worker: the workers resumed from different outer "
        "steps; --log_dir must be one directory every worker can read (a "
        "shared filesystem).")


def checkpoint_model_variables(run_dir: str) -> Dict[str, np.ndarray]:
  """The model variables of a run's latest checkpoint, by checkpoint key."""
  reader = tf.train.load_checkpoint(os.path.join(run_dir, "checkpoints"))
  return {name: reader.get_tensor(name)
          for name in reader.get_variable_to_shape_map()
          if name.startswith("model/")}


def weights_checksum(model: snt.Module) -> float:
  """Sum of |w| over every model variable, in float64 (for comparisons)."""
  return float(sum(np.sum(np.abs(v.numpy()), dtype=np.float64)
                   for v in model.variables))


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


class _Evaluator:
  """Loss and accuracy over a split, with optional BatchNorm recalibration."""

  def __init__(self, model, strategy, dataset, config):
    self._model, self._strategy = model, strategy
    self._dataset = dataset
    self._config = config

    def replica_eval(images, labels, mask):
      logits = model(images, is_training=False)
      loss = train_step_lib.classification_loss(logits, labels)
      correct = tf.cast(tf.equal(
          tf.argmax(logits, -1, output_type=labels.dtype), labels), tf.float32)
      return tf.stack([tf.reduce_sum(loss * mask),
                       tf.reduce_sum(correct * mask), tf.reduce_sum(mask)])

    if config.jit:  # Evaluation has no all-reduce inside the replica.
      replica_eval = tf.function(replica_eval, jit_compile=True)

    @tf.function
    def evaluate(iterator, num_batches):
      totals = tf.zeros([3])
      for _ in tf.range(num_batches):
        per_replica = strategy.run(replica_eval, args=next(iterator))
        totals += strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica,
                                  None)
      return totals

    self._evaluate = evaluate
    norms = batch_norm.batch_norms(model)

    @tf.function
    def recalibrate(iterator, num_batches):
      strategy.run(lambda: batch_norm.reset_statistics(norms))
      for _ in tf.range(num_batches):
        images, _ = next(iterator)
        strategy.run(lambda x: batch_norm.feed(model, x), args=(images,))

    self._recalibrate = recalibrate if norms else None

  def recalibrate_batch_norm(self, epoch: int):
    """Recomputes BatchNorm statistics at the current weights (x, not x').

    Like the reference code's "dry feed": forward passes in training mode on
    training batches (augmented as in training unless
    `recalibration_augment` is off), with no parameter update.
    """
    if self._recalibrate is None:
      return
    iterator = iter(self._strategy.distribute_datasets_from_function(
        lambda context: self._dataset.recalibration_dataset(
            epoch, context, augment=self._config.recalibration_augment)))
    self._recalibrate(iterator,
                      tf.constant(self._config.recalibration_batches))

  def evaluate(self, split: str) -> Dict[str, float]:
    """Loss and accuracy over `split`, summed over all replicas and workers.

    Every pipeline yields the same number of full, padded batches (see
    `CifarData.eval_dataset`); the padding is masked out of the sums.
    """
    iterator = iter(self._strategy.distribute_datasets_from_function(
        lambda context: self._dataset.eval_dataset(split, context, pad=True)))
    loss, correct, count = self._evaluate(
        iterator, tf.constant(self._dataset.padded_eval_batches(split))
    ).numpy()
    return {"loss": float(loss / count), "accuracy": float(correct / count)}


CONFIG_FILE = run_dir_lib.CONFIG_FILE  # Written at every start.
SUMMARY_FILE = run_dir_lib.SUMMARY_FILE  # Once the whole schedule has run.
_write_json = run_dir_lib.write_json


_NOISE_NAMES = {noise_lib.KERNEL: "the compiled kernel",
                noise_lib.TENSORFLOW: "TensorFlow's ops",
                noise_lib.NONE: "nothing (no noise)"}
# The --noise_kernel that resolves to a saved implementation, and where.
_NOISE_CHOICE_OF = {
    noise_lib.KERNEL: "--noise_kernel=on, on a machine where the kernel loads",
    noise_lib.TENSORFLOW: "--noise_kernel=off"}


def _resume_refused(run_dir, refused, noise_reason: str
                    ) -> run_dir_lib.RunDirError:
  """The one-line refusal of a resume under other settings."""
  noise_change = refused.get(config_lib.NOISE_IMPLEMENTATION)
  others = {k: v for k, v in refused.items()
            if k != config_lib.NOISE_IMPLEMENTATION}
  said = []
  if others:
    said.append(f"{run_dir} was trained with other settings: "
                f"{run_dir_lib.format_changes(others)}")
  old_values, accept = "the old values", ""
  if noise_change:
    saved, new = noise_change
    said.append(
        f"{'it' if others else run_dir} drew its Langevin noise with "
        f"{_NOISE_NAMES.get(saved, saved)}, but here it would use "
        f"{_NOISE_NAMES.get(new, new)} ({noise_reason}), and the two drift "
        f"apart at float round-off")
    if saved in _NOISE_CHOICE_OF:
      old_values += f" ({_NOISE_CHOICE_OF[saved]})"
    accept = " and accept the drift"
  return run_dir_lib.RunDirError(
      f"{'; '.join(said)}. Rerun with {old_values} to resume it, pass "
      f"--allow_config_change to continue it under the new ones{accept} "
      f"(recorded in {CONFIG_FILE}), or pass another --run_name for a new "
      f"run.")


def _config_record(config, run_dir: str, resume_step: Optional[int],
                   noise_implementation: noise_lib.Implementation) -> Dict:
  """What config.json will hold; refuses a resume under another experiment.

  The record holds the fields of `config` and the resolved
  `noise_implementation` (`config_lib.NOISE_IMPLEMENTATION` and its
  reason). On resume the stored settings are compared with it: fields of
  `config_lib.RESUME_MAY_CHANGE` may differ (logged); any other difference,
  the noise implementation included, is a RunDirError unless
  `config.allow_config_change`, and then it is logged and appended to the
  `config_changes` history with its step. A record from before the noise
  implementation was saved resumes with a warning.
  """
  record = dataclasses.asdict(config)
  record[config_lib.NOISE_IMPLEMENTATION] = noise_implementation.name
  record[config_lib.NOISE_IMPLEMENTATION_REASON] = noise_implementation.reason
  path = os.path.join(run_dir, CONFIG_FILE)
  if resume_step is None or not os.path.exists(path):
    return record
  try:
    stored = config_lib.complete_record(run_dir_lib.decode_config(
        run_dir_lib.read_json(path), config_lib.FLOAT_FIELDS))
  except (OSError, ValueError) as e:
    raise run_dir_lib.RunDirError(
        f"cannot read {path} ({e}); restore it or move {run_dir} aside to "
        f"start afresh.") from None
  history = list(stored.get(run_dir_lib.CHANGES_KEY, []))
  if (config_lib.NOISE_IMPLEMENTATION not in stored and
      noise_implementation.name != noise_lib.NONE):
    logging.warning(
        "%s does not record which implementation drew the Langevin noise "
        "so far (written before it was recorded); from outer step %d it is "
        "%s (%s). If earlier starts used the other, the run drifts at "
        "float round-off.", path, resume_step,
        _NOISE_NAMES[noise_implementation.name], noise_implementation.reason)
  # The reason explains the record and differs between machines.
  unread = config_lib.unread_fields(record) | {
      config_lib.NOISE_IMPLEMENTATION_REASON}
  allowed, refused = run_dir_lib.config_changes(
      {k: v for k, v in stored.items() if k not in unread},
      {k: v for k, v in record.items() if k not in unread},
      config_lib.RESUME_MAY_CHANGE)
  allowed.pop("allow_config_change", None)  # The override itself.
  if refused and not config.allow_config_change:
    raise _resume_refused(run_dir, refused, noise_implementation.reason)
  if allowed:
    logging.info("Resuming with %s (these only extend or observe the run).",
                 run_dir_lib.format_changes(allowed))
  if refused:
    logging.warning("Resuming at outer step %d under changed settings "
                    "(--allow_config_change): %s; recorded in %s.",
                    resume_step, run_dir_lib.format_changes(refused), path)
  if allowed or refused:
    history.append({"step": resume_step, "overridden": {
        name: list(change) for name, change in sorted(refused.items())},
                    "allowed": {name: list(change) for name, change in
                                sorted(allowed.items())}})
  if history:
    record[run_dir_lib.CHANGES_KEY] = history
  return record


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


def _check_batch_splits(batch_size: int, replicas: int):
  if batch_size % replicas:
    raise ConfigError(
        f"--batch_size={batch_size} is not divisible by the {replicas} "
        f"replicas; use a multiple of {replicas}.")


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


def _any_worker_stopped(strategy, stop: "_StopRequest") -> bool:
  """Whether any worker received SIGTERM/SIGINT; all workers agree."""
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return stop.signal is not None
  local = tf.constant(0.0 if stop.signal is None else 1.0)
  total = strategy.reduce(tf.distribute.ReduceOp.SUM,
                          strategy.run(lambda: tf.identity(local)), axis=None)
  return float(total) > 0


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


class _Checkpoints:
  """A run's checkpoints: the newest intact one restored, only finite state
  saved, and the last good one named when the run diverges."""

  def __init__(self, trainer: "Trainer"):
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
        else _scratch_checkpoint_dir(trainer.strategy),
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
    names = [_checkpoint_name(v) for v in self._saved_variables]
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


class _RunLog:
  """A run's TensorBoard events (the hparams summary, scalars on the
  gradient-evaluation axis) and its progress lines with images/s and ETA."""

  def __init__(self, trainer: "Trainer"):
    self._trainer = trainer
    config = trainer.config
    self._writer = (tf.summary.create_file_writer(trainer.run_dir)
                    if trainer.is_chief else tf.summary.create_noop_writer())
    with self._writer.as_default():
      hparams_api.hparams({k: (v if isinstance(v, (bool, int, float, str))
                               else str(v))
                           for k, v in dataclasses.asdict(config).items()})
    if trainer.is_chief:
      _write_json(os.path.join(trainer.run_dir, CONFIG_FILE),
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
    self.run_dir = os.path.join(config.log_dir,
                                config.run_name or config.default_run_name())
    self.strategy = strategy = make_strategy(config)  # Before TF starts up.
    self.is_chief = is_chief(strategy)
    _check_sync_batch_norm(config, strategy)
    self.noise_implementation = resolve_noise(config, strategy)
    if self.noise_implementation.name != noise_lib.NONE:
      logging.info("Langevin noise: %s (%s).",
                   _NOISE_NAMES[self.noise_implementation.name],
                   self.noise_implementation.reason)
    _check_batch_splits(config.batch_size, strategy.num_replicas_in_sync)
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
    self.checkpoints = _Checkpoints(self)
    self.config_record = _config_record(
        config, self.run_dir, self.checkpoints.resume_step,
        self.noise_implementation)
    self.checkpoints.restore()
    _check_workers_resumed_alike(strategy, self.step)
    self.evaluator = _Evaluator(self.model, strategy, self.data, config)
    self.flatness = (_flatness_tracker(self.model, strategy, self.data,
                                       config.seed)
                     if config.track_flatness_every_steps else None)

  def release(self):
    """Drops the run-directory lock (`run` does when it ends)."""
    if self._lock is not None:
      self._lock.release()
      self._lock = None

  def save_checkpoint(self, step: int) -> str:
    """See `_Checkpoints.save`."""
    return self.checkpoints.save(step)

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

    Raises Preempted after saving a checkpoint when SIGTERM or SIGINT
    arrives, and DivergenceError (saving nothing) on a non-finite loss or
    state.
    """
    try:
      with _StopRequest() as stop:
        return self._run(stop)
    finally:
      self.release()

  def _run(self, stop: "_StopRequest") -> Dict[str, float]:
    config, strategy = self.config, self.strategy
    step = self.step
    first_batch = step * self.optimizer.batches_per_step  # Global.
    iterator = iter(strategy.distribute_datasets_from_function(
        lambda context: self.data.train_dataset(context, first_batch)))
    eval_splits = ["test"] + (["validation"] if config.validation_examples
                              else [])
    log = _RunLog(self)
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
        path = self.save_checkpoint(step)
        logging.info(
            "evaluated at epoch %.2f (effective epoch %.2f): %s; checkpoint "
            "%s", step / self.steps_per_epoch, self.effective_epoch(step),
            ", ".join(f"{s} loss {r['loss']:.4f} accuracy "
                      f"{r['accuracy']:.4f}" for s, r in results.items()),
            path)
        log.flush()
      if step < self.total_steps and _any_worker_stopped(strategy, stop):
        path = (self.checkpoints.latest() if self.checkpoints.saved_at(step)
                else self.save_checkpoint(step))
        log.flush()
        raise Preempted(
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
      _write_json(os.path.join(self.run_dir, SUMMARY_FILE), summary)
    # Identical on every replica and worker of a run; compare across them.
    logging.info("final weights checksum: %r", weights_checksum(self.model))
    logging.info("Finished: %s", ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
        for k, v in summary.items()))
    return summary


class Preempted(RuntimeError):
  """SIGTERM or SIGINT stopped the run after a checkpoint; rerun resumes."""


class _StopRequest:
  """Records SIGTERM/SIGINT instead of dying, while training runs.

  The training loop finishes its current call (no finished outer step is
  lost), saves and raises `Preempted`. A second signal kills the process
  the usual way. Only the main thread can install handlers; elsewhere this
  does nothing.
  """

  def __init__(self):
    self.signal, self._previous = None, {}

  @property
  def name(self) -> str:
    return signal.Signals(self.signal).name

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None:  # Second signal: die as usual.
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      os.kill(os.getpid(), signum)
      return
    self.signal = signum
    logging.warning("%s received: finishing the current step, then saving a "
                    "checkpoint and exiting (send it again to exit now).",
                    signal.Signals(signum).name)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *unused_exc_info):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


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


def _flatness_tracker(model, strategy, data, seed):
  """lambda_max and tr(H) on 2 fixed un-augmented training batches."""
  return hessian.FlatnessTracker(
      model, strategy, lambda context: data.recalibration_dataset(0, context),
      num_batches=2, iterations=10, seed=seed)


def _checkpoint_name(variable) -> str:
  return variable.name.split(":")[0]


def run_directory(config: config_lib.TrainConfig) -> str:
  """Where `config` writes its checkpoints and events."""
  return os.path.join(run_dir_lib.resolve_user_path(config.log_dir),
                      config.run_name or config.default_run_name())


def finished_summary(config: config_lib.TrainConfig) -> Optional[Dict]:
  """The summary of the run of `config` if it ran its whole schedule."""
  path = os.path.join(run_directory(config), SUMMARY_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def train(config: config_lib.TrainConfig,
          statistics_cache: Optional[Dict] = None) -> Dict[str, float]:
  """Trains (or resumes) one run; returns the final summary."""
  return Trainer(config, statistics_cache).run()
