"""Benchmark: synchronous Entropy-SGD vs. Parle on several devices.

In one process, on `--num_devices` logical CPU devices (MirroredStrategy),
measures per outer step the cross-replica all-reduce calls and bytes (from
the traced step) and the wall time, interleaved over several rounds.

    bazel run //bench:distributed -- --num_devices=2 --L=20
"""

from entropy_sgd.core import onednn  # First: before anything imports TensorFlow.

onednn.enable_before_tensorflow()

import statistics
import time

from absl import app
from absl import flags
import tensorflow as tf

from entropy_sgd.core import distribution
from entropy_sgd.core import optimizers
from entropy_sgd.core import train_step as train_step_lib
from entropy_sgd.workloads import wide_resnet

_NUM_DEVICES = flags.DEFINE_integer("num_devices", 2, "Logical CPU devices.")
_MODEL = flags.DEFINE_string("model", "wrn-16-1", "Wide ResNet, wrn-D-K.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Global batch size.")
_L = flags.DEFINE_integer("L", 20, "Langevin steps per outer step.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds.")


def make_runner(strategy, name):
  depth, width = wide_resnet.parse_model_name(_MODEL.value)
  model = train_step_lib.build_model(
      strategy, lambda: wide_resnet.WideResNet(depth, width, 10), [32, 32, 3])
  settings = dict(learning_rate=1.0, num_langevin_steps=_L.value,
                  weight_decay=5e-4, conventions="lua_reference")
  if name == "parle":
    optimizer = optimizers.Parle(rho=float("inf"), **settings)
  else:
    optimizer = optimizers.EntropySGD(**settings)
  images = tf.random.stateless_normal([_BATCH_SIZE.value, 32, 32, 3], [1, 2])
  labels = tf.random.stateless_uniform([_BATCH_SIZE.value], [3, 4],
                                       maxval=10, dtype=tf.int32)
  dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
  iterator = iter(strategy.experimental_distribute_dataset(dataset))
  step = train_step_lib.make_train_step(model, optimizer, strategy,
                                        _BATCH_SIZE.value)
  with distribution.record_all_reduces() as calls:
    float(step(iterator)["loss"])  # Traces, compiles, warms up.
  count, num_bytes = distribution.per_step(calls, _L.value)

  def seconds_per_outer_step():
    start = time.perf_counter()
    float(step(iterator)["loss"])
    return time.perf_counter() - start

  return count, num_bytes, seconds_per_outer_step


def main(argv):
  del argv
  strategy = tf.distribute.MirroredStrategy(
      distribution.logical_cpus(_NUM_DEVICES.value))
  print(f"{_MODEL.value}, global batch {_BATCH_SIZE.value}, L={_L.value}, "
        f"{strategy.num_replicas_in_sync} replicas (logical CPU devices)")
  runners = {name: make_runner(strategy, name)
             for name in ("synchronous", "parle")}
  times = {name: [] for name in runners}
  for _ in range(_ROUNDS.value):
    for name, (_, _, timer) in runners.items():
      times[name].append(timer())
  for name, (count, num_bytes, _) in runners.items():
    print(f"{name:12s} per outer step: {count:3d} all-reduces, "
          f"{num_bytes / 2**20:8.2f} MiB per replica, "
          f"{statistics.median(times[name]):6.2f} s (median of "
          f"{_ROUNDS.value})")
  sync, parle = runners["synchronous"], runners["parle"]
  print(f"parle/synchronous: bytes {parle[1] / sync[1]:.3f}, time "
        f"{statistics.median(times['parle']) / statistics.median(times['synchronous']):.3f}")


if __name__ == "__main__":
  app.run(main)
