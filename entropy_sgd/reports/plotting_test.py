"""Plots from synthetic event files."""

import os

import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

from entropy_sgd.reports import plotting


def write_run(run_dir, accuracies, evaluations_per_point, epochs_per_eval):
  writer = tf.summary.create_file_writer(run_dir)
  with writer.as_default():
    hparams_api.hparams({"opt": "entropy_sgd", "L": 20})  # Not a scalar.
    for i, accuracy in enumerate(accuracies, start=1):
      step = i * evaluations_per_point
      tf.summary.scalar("test/accuracy", accuracy, step=step)
      tf.summary.scalar("train/loss", 1.0 / i, step=step)
      tf.summary.scalar("progress/effective_epoch", i * epochs_per_eval,
                        step=step)
  writer.close()


class PlottingTest(tf.test.TestCase):

  def test_writes_a_png_for_several_runs(self):
    runs = []
    for name, accuracies in (("sgd", [0.3, 0.6]), ("esgd", [0.2, 0.65])):
      runs.append(os.path.join(self.get_temp_dir(), name))
      write_run(runs[-1], accuracies, 10, 1.0)
    output = plotting.plot_runs(runs, os.path.join(self.get_temp_dir(),
                                                   "curves.png"))
    with open(output, "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")


if __name__ == "__main__":
  tf.test.main()
