"""The Keras Entropy-SGD optimizer's cost against Keras' Nesterov SGD.

    bazel run //bench:keras_overhead [-- --rounds=7 --steps=100]

For each model (an MLP of mnistfc's shape, 784-1024-1024-10, and the
example's CNN, `examples/keras_models.py`), both optimizers train the same
model by `model.fit` on the same synthetic batches; rounds alternate between
them, so both see the same machine. Each fit step is one gradient evaluation
for both. A callback stamps the end of every step, and a round's cost per
gradient evaluation is the time from the first step's end to the last's,
over the steps between. This leaves out what `fit` spends around its steps:
as `fit` returns, destroying its dataset iterator waited up to 5 s here for
tf.data's autotuning thread (not with `autotune.enabled = False`), for
either optimizer, so timing whole `fit` calls measured that wait. Prints
one line per model, `median ratio entropy_sgd/sgd = X` (over rounds), and
`fit`'s cost around the steps.
"""

import time

from entropy_sgd.core import onednn  # First: before anything imports TensorFlow.

onednn.enable_before_tensorflow()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import keras
import numpy as np
import tensorflow as tf

from entropy_sgd.core import keras_plugin
from entropy_sgd.core import noise as noise_lib
from examples import keras_models

_ROUNDS = flags.DEFINE_integer("rounds", 7, "Alternating timing rounds.")
_STEPS = flags.DEFINE_integer("steps", 100, "Fit steps (minibatches) per "
                              "round.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_L = flags.DEFINE_integer("L", 20, "Langevin steps of Entropy-SGD.")
_NOISE = flags.DEFINE_float("noise", 1e-4, "Thermal noise eps (0: none).")


def mlp():
  return keras.Sequential([
      keras.Input([784]),
      keras.layers.Dense(1024, activation="relu"),
      keras.layers.Dense(1024, activation="relu"),
      keras.layers.Dense(10),
  ]), [784]


def cnn():
  return keras_models.small_cnn(), [32, 32, 3]


def compiled(build, optimizer):
  keras.utils.set_random_seed(0)
  model, shape = build()
  model.compile(optimizer=optimizer, loss=keras.losses.
                SparseCategoricalCrossentropy(from_logits=True))
  return model, shape


def dataset(shape, steps, batch_size):
  rng = np.random.RandomState(0)
  x = rng.normal(size=[batch_size] + shape).astype(np.float32)
  y = rng.randint(10, size=batch_size).astype(np.int32)
  one = tf.data.Dataset.from_tensors((x, y))
  return one.repeat(steps).cache()


class StepClock(keras.callbacks.Callback):
  """Stamps the end of each training step."""

  def on_train_begin(self, logs=None):
    self.stamps = []

  def on_train_batch_end(self, batch, logs=None):
    self.stamps.append(time.perf_counter())

  def seconds_per_step(self):
    return (self.stamps[-1] - self.stamps[0]) / (len(self.stamps) - 1)


def main(argv):
  del argv
  print(f"oneDNN {'on' if onednn.is_on() else 'off'}; noise "
        f"{noise_lib.kernel_status()}; L = {_L.value}, batch "
        f"{_BATCH_SIZE.value}, {_STEPS.value} steps x {_ROUNDS.value} rounds")
  for name, build in (("mlp-784-1024-1024-10", mlp), ("small-cnn", cnn)):
    contenders = {
        "sgd": compiled(build, keras.optimizers.SGD(
            0.1, momentum=0.9, nesterov=True)),
        "entropy_sgd": compiled(build, keras_plugin.EntropySGD(
            learning_rate=1.0, num_langevin_steps=_L.value,
            langevin_learning_rate=0.1, noise=_NOISE.value,
            conventions="lua_reference")),
    }
    data = dataset(contenders["sgd"][1], _STEPS.value, _BATCH_SIZE.value)
    for model, _ in contenders.values():  # Trace and warm up.
      model.fit(data, epochs=1, verbose=0)
    seconds = {key: [] for key in contenders}
    around_steps = []
    for _ in range(_ROUNDS.value):
      for key, (model, _) in contenders.items():
        clock = StepClock()
        start = time.perf_counter()
        model.fit(data, epochs=1, verbose=0, callbacks=[clock])
        total = time.perf_counter() - start
        seconds[key].append(clock.seconds_per_step())
        around_steps.append(total - _STEPS.value * seconds[key][-1])
    ratios = np.array(seconds["entropy_sgd"]) / np.array(seconds["sgd"])
    per_step = {key: 1e3 * np.median(v) for key, v in seconds.items()}
    print(f"{name}: sgd {per_step['sgd']:.2f} ms, entropy_sgd "
          f"{per_step['entropy_sgd']:.2f} ms per gradient evaluation; "
          f"median ratio entropy_sgd/sgd = {np.median(ratios):.3f} "
          f"(rounds {ratios.min():.3f}-{ratios.max():.3f}); fit's cost "
          f"around the steps: median {np.median(around_steps):.2f} s, "
          f"max {np.max(around_steps):.2f} s")


if __name__ == "__main__":
  app.run(main)
