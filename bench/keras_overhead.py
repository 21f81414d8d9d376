"""The Keras Entropy-SGD optimizer's cost against Keras' Nesterov SGD.

    bazel run //bench:keras_overhead [-- --rounds=7 --steps=100]

For each model (an MLP of mnistfc's shape, 784-1024-1024-10, and a small
CNN), both optimizers train the same model by `model.fit` on the same
synthetic batches; rounds alternate between them, so both see the same
machine. Each fit step is one gradient evaluation for both, so the ratio of
the times of a fit epoch is the cost per gradient evaluation. Prints one
line per model: `median ratio entropy_sgd/sgd = X` (over rounds).
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
  return keras.Sequential([
      keras.Input([32, 32, 3]),
      keras.layers.Conv2D(32, 3, activation="relu"),
      keras.layers.MaxPooling2D(),
      keras.layers.Conv2D(64, 3, activation="relu"),
      keras.layers.GlobalAveragePooling2D(),
      keras.layers.Dense(10),
  ]), [32, 32, 3]


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
    for _ in range(_ROUNDS.value):
      for key, (model, _) in contenders.items():
        start = time.perf_counter()
        model.fit(data, epochs=1, verbose=0)
        seconds[key].append(time.perf_counter() - start)
    ratios = np.array(seconds["entropy_sgd"]) / np.array(seconds["sgd"])
    per_step = {key: 1e3 * np.median(v) / _STEPS.value
                for key, v in seconds.items()}
    print(f"{name}: sgd {per_step['sgd']:.2f} ms, entropy_sgd "
          f"{per_step['entropy_sgd']:.2f} ms per gradient evaluation; "
          f"median ratio entropy_sgd/sgd = {np.median(ratios):.3f} "
          f"(rounds {ratios.min():.3f}-{ratios.max():.3f})")


if __name__ == "__main__":
  app.run(main)
