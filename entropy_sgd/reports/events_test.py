"""The one event reader, on synthetic event files (also resumed runs)."""

import os
import time

import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

from entropy_sgd.reports import events


def write_segment(run_dir, steps, epochs_per_step, accuracy_of):
  """One start of a run: an event file with scalars at `steps`."""
  writer = tf.summary.create_file_writer(run_dir)
  with writer.as_default():
    hparams_api.hparams({"opt": "entropy_sgd", "L": 20})  # Not a scalar.
    for step in steps:
      tf.summary.scalar("test/accuracy", accuracy_of(step), step=step)
      tf.summary.scalar("progress/effective_epoch", step * epochs_per_step,
                        step=step)
  writer.close()
  time.sleep(0.01)  # Distinct event-file names and wall times.


class ReadScalarsTest(tf.test.TestCase):

  def test_series_use_effective_epochs(self):
    run = os.path.join(self.get_temp_dir(), "run")
    write_segment(run, [40, 80, 120], 0.5 / 40, {40: 0.2, 80: 0.5,
                                                  120: 0.7}.get)
    epochs, values = events.read_scalars(run)["test/accuracy"]
    self.assertAllClose(epochs, [0.5, 1.0, 1.5])
    self.assertAllClose(values, [0.2, 0.5, 0.7])
    self.assertNotIn("_hparams_/session_start_info", events.read_scalars(run))

  def test_a_resumed_segment_replaces_the_lost_points(self):
    run = os.path.join(self.get_temp_dir(), "resumed")
    # The first start logged steps 10..40 but its checkpoint was at 20; the
    # second start resumes there and logs 30..50 anew.
    write_segment(run, [10, 20, 30, 40], 0.1, lambda s: 1.0)
    write_segment(run, [30, 40, 50], 0.1, lambda s: 2.0)
    self.assertLen(events.event_files(run), 2)
    epochs, values = events.read_scalars(run)["test/accuracy"]
    self.assertAllClose(epochs, [1.0, 2.0, 3.0, 4.0, 5.0])
    self.assertAllClose(values, [1.0, 1.0, 2.0, 2.0, 2.0])

  def test_no_event_files(self):
    empty = self.create_tempdir().full_path
    with self.assertRaisesRegex(events.NotARunError,
                                "no TensorBoard event files"):
      events.read_scalars(empty)

  def test_no_progress_scalar(self):
    run = os.path.join(self.get_temp_dir(), "bare")
    writer = tf.summary.create_file_writer(run)
    with writer.as_default():
      tf.summary.scalar("train/loss", 1.0, step=1)
    writer.close()
    with self.assertRaisesRegex(events.NotARunError,
                                "no progress/effective_epoch"):
      events.read_scalars(run)


if __name__ == "__main__":
  tf.test.main()
