"""A small Keras CNN on CIFAR-10, trained by model.fit with Entropy-SGD.

    bazel run //examples:keras_cifar10 -- --data_dir=../shared/data/cifar10
    bazel run //examples:keras_cifar10 -- --max_steps=2   # smoke run

Everything below `main` is an ordinary Keras pipeline; the one Entropy-SGD
change is marked: the optimizer. Without --data_dir the data come from tensorflow-datasets.
"""

from absl import app
from absl import flags
import keras

from entropy_sgd.core import keras_plugin as entropy_sgd_keras
from entropy_sgd.train import run_dir
from entropy_sgd.workloads import data
import keras_models  # examples/keras_models.py, beside this file

flags.DEFINE_string("data_dir", None, "CIFAR-10 binary layout; relative "
                    "paths are resolved against where `bazel run` ran.")
flags.DEFINE_integer("batch_size", 128, "Minibatch size.")
flags.DEFINE_integer("L", 5, "Langevin steps (minibatches) per update.")
flags.DEFINE_integer("epochs", 5, "Epochs: passes over the data, so "
                     "effective epochs.")
flags.DEFINE_integer("max_steps", None, "Cap minibatches per epoch.")
flags.DEFINE_string("tensorboard_dir", None, "TensorBoard directory.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cifar = data.CifarData(data.PipelineConfig(
      dataset="cifar10", batch_size=FLAGS.batch_size,
      data_dir=run_dir.resolve_user_path(FLAGS.data_dir)))
  model = keras_models.small_cnn()
  model.compile(
      optimizer=entropy_sgd_keras.EntropySGD(  # Entropy-SGD (was "sgd").
          learning_rate=1.0, num_langevin_steps=FLAGS.L,
          langevin_learning_rate=0.1, gamma=0.03, scoping=1e-3, noise=1e-4,
          conventions="lua_reference"),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=["accuracy"])
  steps = cifar.steps_per_epoch
  # Optional: validation sees x even when an epoch ends inside an outer
  # step; gamma and ||x - mu|| reach the logs.
  callbacks = [entropy_sgd_keras.EvaluateAtAnchor(),
               entropy_sgd_keras.Diagnostics()]
  if FLAGS.tensorboard_dir:
    callbacks.append(keras.callbacks.TensorBoard(
        run_dir.resolve_user_path(FLAGS.tensorboard_dir)))
  model.fit(cifar.train_dataset(), epochs=FLAGS.epochs,
            validation_data=cifar.eval_dataset("test"),
            steps_per_epoch=min(steps, FLAGS.max_steps or steps),
            callbacks=callbacks, verbose=2)


if __name__ == "__main__":
  app.run(main)
