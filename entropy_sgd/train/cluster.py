"""The devices and processes of a run: the tf.distribute strategy of
--strategy, which process is the chief, and the checks that keep the
replicas and workers of one run in agreement."""

import json
import os
import tempfile

import tensorflow as tf

from entropy_sgd.core import distribution
from entropy_sgd.train import config as config_lib

ConfigError = config_lib.ConfigError


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


def scratch_checkpoint_dir(strategy) -> str:
  """Where a non-chief worker saves (and at once deletes) its checkpoints."""
  resolver = strategy.cluster_resolver
  return os.path.join(
      tempfile.gettempdir(), f"entropy_sgd_{resolver.task_type}"
      f"{resolver.task_id}_{os.getpid()}_checkpoints")


def check_sync_batch_norm(config, strategy):
  if (config.sync_batch_norm and config.jit and
      config.strategy in ("mirrored", "multi_worker") and
      strategy.num_replicas_in_sync > 1 and
      not all("GPU" in device.upper()
              for device in strategy.extended.worker_devices)):
    raise ConfigError(
        f"--sync_batch_norm with --jit needs GPUs under --strategy="
        f"{config.strategy}: on CPUs TensorFlow cannot all-reduce inside an "
        f"XLA-compiled replica step; drop --jit or --sync_batch_norm.")


def check_batch_splits(batch_size: int, replicas: int):
  if batch_size % replicas:
    raise ConfigError(
        f"--batch_size={batch_size} is not divisible by the {replicas} "
        f"replicas; use a multiple of {replicas}.")


def check_workers_resumed_alike(strategy, step: int):
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


def any_worker_stopped(strategy, stopped: bool) -> bool:
  """Whether any worker was `stopped` (by SIGTERM/SIGINT); all agree."""
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return stopped
  local = tf.constant(1.0 if stopped else 0.0)
  total = strategy.reduce(tf.distribute.ReduceOp.SUM,
                          strategy.run(lambda: tf.identity(local)), axis=None)
  return float(total) > 0
