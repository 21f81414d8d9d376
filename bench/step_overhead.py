"""Benchmark: does Entropy-SGD's inner loop cost more than L plain SGD steps?

Measures, in one process and interleaved, the time per gradient evaluation
of Nesterov SGD and of Entropy-SGD (outer-step time / L) on any `--model`
(the paper's mnistfc, lenet, allcnn or a Wide ResNet), with and without XLA,
on the same synthetic in-memory batch, and prints the ratio. Targets: <= 1.15
on mnistfc and lenet, <= 1.02 on wrn-16-1.

    bazel run //bench:step_overhead -- --model=wrn-16-1 --batch_size=128
    bazel run //bench:step_overhead -- --model=mnistfc --jit=off
"""

import statistics
import time

from absl import app
from absl import flags
import tensorflow as tf

from entropy_sgd import models
from entropy_sgd import optimizers
from entropy_sgd import train_step as train_step_lib

_MODEL = flags.DEFINE_string(
    "model", "wrn-16-1", "mnistfc, lenet (MNIST-shaped input), allcnn or "
    "wrn-DEPTH-WIDTH (CIFAR-shaped input).")
_NOISE = flags.DEFINE_float("noise", 1e-4, "Entropy-SGD thermal noise eps "
                            "(0: no Langevin noise is drawn).")
_STEPS_PER_CALL = flags.DEFINE_integer(
    "steps_per_loop", 1, "Outer steps per compiled call, for both "
    "optimizers (as the launchers' --steps_per_loop).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_L = flags.DEFINE_integer("L", 20, "Langevin steps of Entropy-SGD.")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 8, "Interleaved measurement rounds; the median is reported.")
_OUTER_STEPS = flags.DEFINE_integer(
    "outer_steps", 1, "Entropy-SGD outer steps per round (SGD runs the same "
    "number of gradient evaluations).")
_JIT = flags.DEFINE_enum("jit", "both", ["both", "on", "off"],
                         "Measure with XLA, without, or both.")


def make_runner(optimizer_name, jit_compile):
  shape = (models.MNIST_SHAPE if "mnist" in models.spec(_MODEL.value).datasets
           else models.CIFAR_SHAPE)
  strategy = tf.distribute.get_strategy()
  model = train_step_lib.build_model(
      strategy, lambda: models.build(_MODEL.value, 10), shape)
  if optimizer_name == "entropy_sgd":
    optimizer = optimizers.EntropySGD(
        learning_rate=1.0, num_langevin_steps=_L.value, weight_decay=5e-4,
        noise=_NOISE.value, conventions="lua_reference",
        jit_compile=jit_compile)
  else:
    optimizer = optimizers.SGD(0.1, momentum=0.9, nesterov=True,
                               weight_decay=5e-4, jit_compile=jit_compile)
  images = tf.random.stateless_normal([_BATCH_SIZE.value, *shape], [1, 2])
  labels = tf.random.stateless_uniform([_BATCH_SIZE.value], [3, 4],
                                       maxval=10, dtype=tf.int32)
  dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
  iterator = iter(dataset)
  step = train_step_lib.make_train_step(
      model, optimizer, strategy, _BATCH_SIZE.value, jit_compile=jit_compile)
  evaluations_per_call = (optimizer.gradient_evaluations_per_step *
                          _STEPS_PER_CALL.value)
  calls = max(1, _OUTER_STEPS.value * _L.value // evaluations_per_call)

  def seconds_per_evaluation():
    start = time.perf_counter()
    for _ in range(calls):
      metrics = step(iterator, _STEPS_PER_CALL.value)
    float(metrics["loss"])  # Waits for the last step.
    return (time.perf_counter() - start) / (calls * evaluations_per_call)

  seconds_per_evaluation()  # Trace, compile and warm up.
  return seconds_per_evaluation


def main(argv):
  del argv
  jit_modes = {"both": [False, True], "on": [True], "off": [False]}
  print(f"{_MODEL.value}, batch {_BATCH_SIZE.value}, L={_L.value}, "
        f"noise={_NOISE.value}, steps_per_loop={_STEPS_PER_CALL.value}, "
        f"{_ROUNDS.value} rounds x {_OUTER_STEPS.value * _L.value} gradient "
        f"evaluations per optimizer; TF {tf.__version__}, "
        f"{len(tf.config.list_physical_devices())} device(s)")
  for jit_compile in jit_modes[_JIT.value]:
    runners = {name: make_runner(name, jit_compile)
               for name in ("nesterov", "entropy_sgd")}
    times = {name: [] for name in runners}
    for round_index in range(_ROUNDS.value):
      for name, runner in runners.items():
        times[name].append(runner())
      print(f"  xla={jit_compile} round {round_index + 1}/{_ROUNDS.value}: "
            + ", ".join(f"{n} {t[-1] * 1e3:.1f} ms" for n, t in times.items()),
            flush=True)
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = median["entropy_sgd"] / median["nesterov"]
    fastest = {name: min(t) for name, t in times.items()}
    print(f"xla={str(jit_compile):5s}  fastest rounds: nesterov "
          f"{fastest['nesterov'] * 1e3:.1f} ms, entropy_sgd "
          f"{fastest['entropy_sgd'] * 1e3:.1f} ms; ratio "
          f"{fastest['entropy_sgd'] / fastest['nesterov']:.3f}")
    print(f"xla={str(jit_compile):5s}  per gradient evaluation: "
          f"nesterov {median['nesterov'] * 1e3:7.1f} ms "
          f"({_BATCH_SIZE.value / median['nesterov']:6.1f} images/s), "
          f"entropy_sgd {median['entropy_sgd'] * 1e3:7.1f} ms "
          f"({_BATCH_SIZE.value / median['entropy_sgd']:6.1f} images/s); "
          f"median ratio entropy_sgd/nesterov = {ratio:.3f} "
          f"({'meets' if ratio <= 1.05 else 'misses'} the 1.05 target)",
          flush=True)


if __name__ == "__main__":
  app.run(main)
