"""Benchmark: what does a Hessian-vector product cost next to a gradient?

Times, in one process and interleaved, a gradient evaluation and a
Hessian-vector product (forward-over-backward and double backprop) of the
mean cross-entropy over one in-memory batch, on any `--model`, through the
same compiled path `//launch:landscape` uses (`hessian.Objective`: one
`strategy.run` over the cached batch, BatchNorm in inference mode), and
prints the median over rounds of the ratio HVP / gradient. A round times
every kind `--calls` times, one call at a time, and keeps the fastest call
of each (robust to a machine shared with other jobs). Target: <= 3.

    bazel run //bench:hessian_vector -- --model=mnistfc
    bazel run //bench:hessian_vector -- --model=wrn-16-1 --batch_size=128
"""

from entropy_sgd.core import onednn  # First: before anything imports TensorFlow.

onednn.enable_before_tensorflow()

import statistics
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from entropy_sgd.analysis import hessian
from entropy_sgd.core import train_step as train_step_lib
from entropy_sgd.workloads import models

_MODEL = flags.DEFINE_string(
    "model", "mnistfc", "mnistfc, lenet (MNIST-shaped input), allcnn or "
    "wrn-DEPTH-WIDTH (CIFAR-shaped input).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 8, "Interleaved measurement rounds; the median is reported.")
_CALLS = flags.DEFINE_integer("calls", 5, "Calls of each kind per round.")
_TARGET = 3.0


def main(argv):
  del argv
  shape = (models.MNIST_SHAPE if "mnist" in models.spec(_MODEL.value).datasets
           else models.CIFAR_SHAPE)
  strategy = tf.distribute.get_strategy()
  model = train_step_lib.build_model(
      strategy, lambda: models.build(_MODEL.value, 10), shape)
  images = tf.random.stateless_normal([_BATCH_SIZE.value, *shape], [1, 2])
  labels = tf.random.stateless_uniform([_BATCH_SIZE.value], [3, 4],
                                       maxval=10, dtype=tf.int32)
  dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
  batches = hessian.Batches(strategy, lambda context: dataset, 1)
  hessian.recalibrate_batch_norm(model, batches)
  objectives = {
      method: hessian.Objective(hessian.classification_loss(model),
                                model.trainable_variables, batches,
                                method=method)
      for method in hessian.HVP_METHODS}
  any_objective = objectives[hessian.HVP_METHODS[0]]
  rng = np.random.default_rng(0)
  vector = any_objective.unflatten(rng.standard_normal(
      any_objective.num_parameters).astype(any_objective.dtype))
  runners = {"gradient": any_objective.gradient_tensors}
  for method, objective in objectives.items():
    runners[method] = lambda o=objective: o.hvp_tensors(vector)

  def seconds_per_call(run):
    fastest = float("inf")
    for _ in range(_CALLS.value):
      start = time.perf_counter()
      run()[-1].numpy()  # Waits for the result.
      fastest = min(fastest, time.perf_counter() - start)
    return fastest

  for run in runners.values():
    seconds_per_call(run)  # Trace and warm up.
  print(f"{_MODEL.value}, batch {_BATCH_SIZE.value}, "
        f"{any_objective.num_parameters:,} parameters, {_ROUNDS.value} rounds "
        f"x {_CALLS.value} calls of each (fastest call per round); TF "
        f"{tf.__version__}", flush=True)
  times = {name: [] for name in runners}
  for round_index in range(_ROUNDS.value):
    for name, run in runners.items():
      times[name].append(seconds_per_call(run))
    print(f"  round {round_index + 1}/{_ROUNDS.value}: " + ", ".join(
        f"{name} {t[-1] * 1e3:.1f} ms" for name, t in times.items()),
          flush=True)
  gradient = statistics.median(times["gradient"])
  for method in hessian.HVP_METHODS:
    ratios = [h / g for h, g in zip(times[method], times["gradient"])]
    ratio = statistics.median(ratios)
    fastest = min(times[method]) / min(times["gradient"])
    print(f"{method:22s} HVP {statistics.median(times[method]) * 1e3:7.1f} ms"
          f", gradient {gradient * 1e3:7.1f} ms; median ratio HVP/gradient = "
          f"{ratio:.2f} ({'meets' if ratio <= _TARGET else 'misses'} the "
          f"{_TARGET:g} target); fastest rounds {fastest:.2f}", flush=True)


if __name__ == "__main__":
  app.run(main)
