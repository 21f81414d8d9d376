"""The landscape driver: reading a run, the progress ETA."""

import dataclasses
import os

from absl.testing import absltest
import tensorflow as tf

from entropy_sgd.reports import landscape
from entropy_sgd.train import config as config_lib
from entropy_sgd.train import run_dir as run_dir_lib
from entropy_sgd.train import training
from entropy_sgd.workloads import data as data_lib

TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                        "testdata")


class ReadRunTest(tf.test.TestCase):

  def test_newest_intact_checkpoint_and_nothing_moved(self):
    run = self.create_tempdir().full_path
    run_dir_lib.write_json(
        os.path.join(run, run_dir_lib.CONFIG_FILE),
        dataclasses.asdict(config_lib.TrainConfig(dataset="mnist",
                                                  model="mnistfc")))
    variable = tf.Variable(tf.ones([10]))
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(v=variable), run_dir_lib.checkpoint_dir(run), 5)
    for step in (1, 2):
      manager.save(checkpoint_number=step)
    data = os.path.join(run_dir_lib.checkpoint_dir(run),
                        "ckpt-2.data-00000-of-00001")
    with open(data, "r+b") as f:
      f.truncate(5)
    before = sorted(os.listdir(run_dir_lib.checkpoint_dir(run)))
    with self.assertLogs(level="WARNING") as logs:
      config, checkpoint = landscape.read_run(run)
    self.assertEqual(config.rho, float("inf"))  # Strict JSON read back.
    self.assertEqual(os.path.basename(checkpoint), "ckpt-1")
    self.assertIn("newest checkpoint is damaged", logs.output[0])
    self.assertEqual(sorted(os.listdir(run_dir_lib.checkpoint_dir(run))),
                     before)


class RecalibrationTest(tf.test.TestCase):

  def test_batch_norm_is_recalibrated_on_batches_augmented_as_in_training(self):
    root = self.create_tempdir().full_path
    summary = training.train(config_lib.from_preset(
        "nesterov", dataset="cifar10", model="wrn-10-1", batch_size=20,
        data_dir=os.path.join(TESTDATA, "cifar10"), log_dir=root,
        augment="flip_crop", max_steps=2))
    results = {}
    for augment in (True, False):
      results[augment] = landscape.analyse(landscape.Settings(
          run_dir=summary["run_dir"], measures=(), batches=2,
          output_dir=os.path.join(root, f"out_{augment}"),
          recalibration_augment=augment))
    self.assertEqual(results[True]["batch_norm_recalibration"], "augmented")
    self.assertEqual(results[False]["batch_norm_recalibration"],
                     "un-augmented")
    # Other statistics, another loss, on the same un-augmented batches.
    self.assertNotAlmostEqual(results[True]["loss"], results[False]["loss"],
                              places=4)
    self.assertEqual(results[True]["examples"], 40)
    # The held-out split is measured at each run's own statistics too.
    config, _ = landscape.read_run(summary["run_dir"])
    test_examples = data_lib.ImageData(config_lib.pipeline_config(
        config)).num_examples("test")
    for result in results.values():
      self.assertEqual(result["heldout_split"], "test")
      self.assertEqual(result["heldout_examples"], test_examples)
      self.assertBetween(result["heldout_accuracy"], 0.0, 1.0)
    self.assertNotAlmostEqual(results[True]["heldout_loss"],
                              results[False]["heldout_loss"], places=4)


class HeldoutBatchSizeTest(absltest.TestCase):

  def test_every_example_once_in_equal_batches_where_possible(self):
    for examples in range(1, 130):
      for batch_size in (1, 7, 20, 128):
        for replicas in (1, 2, 4):
          size = landscape.heldout_batch_size(examples, batch_size, replicas)
          self.assertEqual(size % replicas, 0)
          limit = min(batch_size, examples)
          divisors = [d for d in range(replicas, limit + 1, replicas)
                      if examples % d == 0]
          if divisors and 4 * max(divisors) >= limit:
            self.assertEqual(size, max(divisors), (examples, batch_size))
          else:  # No good divisor: the largest batch; the tail is dropped.
            self.assertEqual(size, max(replicas, limit - limit % replicas))
    self.assertEqual(landscape.heldout_batch_size(5000, 128, 1), 125)
    self.assertEqual(landscape.heldout_batch_size(10000, 128, 2), 100)


class ProgressTest(tf.test.TestCase):

  def test_eta_prices_the_passes_left(self):
    progress = landscape.Progress([("a", {"hvp": 4}), ("b", {"loss": 10})])
    progress.start("a")
    progress.on_pass("hvp", 2.0)
    # 3 products at 2 s, then 10 forward passes at 2 s / 8.
    self.assertAlmostEqual(progress.remaining_seconds(), 6.0 + 2.5)
    progress.finish()
    self.assertAlmostEqual(progress.remaining_seconds(), 2.5)


if __name__ == "__main__":
  tf.test.main()
