"""The results tool on fake run directories with known values.

Each fake run has config.json and events written with tf.summary under the
tags and steps entropy_sgd.train.training uses; expected numbers are computed here
with NumPy from the same float32-rounded values.
"""

import csv
import dataclasses
import json
import math
import os

from absl.testing import absltest
import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

from entropy_sgd.core import chrono
from entropy_sgd.reports import results
from entropy_sgd.train import config as config_lib

TRAIN_EXAMPLES, BATCH_SIZE = 200, 20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def as_float32(values):
  """What a float32 summary gives back, as float64."""
  return np.asarray(values, np.float32).astype(np.float64)


def make_config(**overrides):
  return dataclasses.asdict(config_lib.TrainConfig(
      model="wrn-10-1", batch_size=BATCH_SIZE, **overrides))


def write_fake_run(run_dir, config, test_accuracies, validation_accuracies=(),
                   summary=None, write_config=True, write_hparams=False):
  """A run that evaluates after each of len(test_accuracies) epochs.

  An epoch is TRAIN_EXAMPLES / BATCH_SIZE outer steps of
  `gradient_evaluations_per_step` gradient evaluations each (the step axis);
  the training loss after epoch i is 1 / i.
  """
  os.makedirs(run_dir, exist_ok=True)
  evaluations = config["L"] if config["opt"] == "entropy_sgd" else 1
  steps_per_epoch = TRAIN_EXAMPLES // BATCH_SIZE
  writer = tf.summary.create_file_writer(run_dir)
  with writer.as_default():
    if write_hparams:  # As training does: non-scalars as strings.
      hparams_api.hparams({k: v if isinstance(v, (bool, int, float, str))
                           else str(v) for k, v in config.items()})
    for epoch, accuracy in enumerate(test_accuracies, start=1):
      step = epoch * steps_per_epoch * evaluations
      tf.summary.scalar("train/loss", 1.0 / epoch, step=step)
      tf.summary.scalar("train/accuracy", accuracy, step=step)
      tf.summary.scalar("progress/effective_epoch",
                        step * BATCH_SIZE / TRAIN_EXAMPLES, step=step)
      tf.summary.scalar("progress/outer_epoch", epoch, step=step)
      tf.summary.scalar("test/loss", 2.0 - accuracy, step=step)
      tf.summary.scalar("test/accuracy", accuracy, step=step)
      if validation_accuracies:
        tf.summary.scalar("validation/accuracy",
                          validation_accuracies[epoch - 1], step=step)
  writer.close()
  if write_config:
    with open(os.path.join(run_dir, results.CONFIG_FILE), "w") as f:
      json.dump(config, f)
  if summary is not None:
    with open(os.path.join(run_dir, results.SUMMARY_FILE), "w") as f:
      json.dump(summary, f)
  return run_dir


def write_raw_segment(run_dir, name, wall_times, points):
  """An event file with chosen wall times: points are (step, tag, value)."""
  os.makedirs(run_dir, exist_ok=True)
  path = os.path.join(run_dir, f"events.out.tfevents.{name}.host.v2")
  with tf.io.TFRecordWriter(path) as writer:
    writer.write(tf.compat.v1.Event(
        wall_time=wall_times[0], file_version="brain.Event:2"
    ).SerializeToString())
    for wall_time, (step, tag, value) in zip(wall_times[1:], points):
      value_proto = tf.compat.v1.Summary.Value(
          tag=tag, tensor=tf.make_tensor_proto(np.float32(value)))
      writer.write(tf.compat.v1.Event(
          wall_time=wall_time, step=step,
          summary=tf.compat.v1.Summary(value=[value_proto])
      ).SerializeToString())
  return path


# Two experiments on CIFAR-10: Nesterov with a validation split (3 seeds, two
# finished) and Entropy-SGD with L = 2 (2 seeds, with other log dirs and run
# names, which do not matter).
NESTEROV_TEST = {0: [0.5, 0.7, 0.8], 1: [0.55, 0.80, 0.78],
                 2: [0.52, 0.69, 0.81]}
NESTEROV_VALIDATION = {0: [0.4, 0.6, 0.75], 1: [0.45, 0.7, 0.72],
                       2: [0.5, 0.6, 0.7]}
ENTROPY_SGD_TEST = {0: [0.6, 0.85], 1: [0.65, 0.83]}


class ResultsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = self.create_tempdir().full_path
    self.runs_dir = os.path.join(self.root, "runs")

  def write_two_experiments(self):
    for seed, accuracies in NESTEROV_TEST.items():
      write_fake_run(
          os.path.join(self.runs_dir, f"nesterov_seed{seed}"),
          make_config(opt="nesterov", seed=seed, validation_examples=20,
                      log_dir=self.runs_dir),
          accuracies, NESTEROV_VALIDATION[seed],
          summary={"outer_steps": 30} if seed < 2 else None)
    for seed, accuracies in ENTROPY_SGD_TEST.items():
      write_fake_run(
          os.path.join(self.runs_dir, f"esgd_seed{seed}"),
          make_config(opt="entropy_sgd", L=2, seed=seed, lr=1.0,
                      log_dir=f"/elsewhere/{seed}", run_name=f"name{seed}",
                      data_dir=f"/data/copy{seed}"),
          accuracies)

  def test_groups_runs_that_differ_only_in_seed(self):
    self.write_two_experiments()
    runs = [results.load_run(d)
            for d in results.expand_run_dirs([self.runs_dir])]
    groups = results.group_runs(runs)
    self.assertEqual([g.optimizer for g in groups],
                     ["entropy_sgd (L=2)", "nesterov"])
    self.assertEqual([[r.config["seed"] for r in g.runs] for g in groups],
                     [[0, 1], [0, 1, 2]])
    self.assertEqual([g.distinguishing for g in groups], ["", ""])

  def test_rows_match_numpy(self):
    self.write_two_experiments()
    runs = [results.load_run(d)
            for d in results.expand_run_dirs([self.runs_dir])]
    esgd, nesterov = [results.summarize_group(g)
                      for g in results.group_runs(runs)]

    final = 100 * (1 - as_float32([a[-1] for a in NESTEROV_TEST.values()]))
    best = 100 * (1 - as_float32([max(a) for a in NESTEROV_TEST.values()]))
    validation = 100 * (1 - as_float32(
        [a[-1] for a in NESTEROV_VALIDATION.values()]))
    self.assertEqual((nesterov.dataset, nesterov.model, nesterov.seeds,
                      nesterov.finished_seeds), ("cifar10", "wrn-10-1", 3, 2))
    self.assertAlmostEqual(nesterov.final_test_error_mean, np.mean(final))
    self.assertAlmostEqual(nesterov.final_test_error_std,
                           np.std(final, ddof=1))
    self.assertAlmostEqual(nesterov.best_test_error_mean, np.mean(best))
    self.assertNotAlmostEqual(np.mean(best), np.mean(final))  # Seed 1.
    self.assertAlmostEqual(nesterov.final_validation_error_mean,
                           np.mean(validation))
    self.assertAlmostEqual(nesterov.final_validation_error_std,
                           np.std(validation, ddof=1))
    self.assertAlmostEqual(nesterov.effective_epochs, 3.0, places=6)

    final = 100 * (1 - as_float32([a[-1] for a in ENTROPY_SGD_TEST.values()]))
    self.assertEqual((esgd.seeds, esgd.finished_seeds), (2, 0))
    self.assertAlmostEqual(esgd.final_test_error_mean, np.mean(final))
    self.assertAlmostEqual(esgd.final_test_error_std, np.std(final, ddof=1))
    self.assertAlmostEqual(esgd.effective_epochs, 4.0, places=6)  # L * 2.
    self.assertTrue(math.isnan(esgd.final_validation_error_mean))

  def test_markdown_csv_and_plots(self):
    self.write_two_experiments()
    output_dir = os.path.join(self.root, "out")
    written = results.write_results([self.runs_dir], output_dir)

    with open(written.csv) as f:
      rows = list(csv.DictReader(f))
    self.assertLen(rows, 2)
    nesterov = rows[1]
    final = 100 * (1 - as_float32([a[-1] for a in NESTEROV_TEST.values()]))
    self.assertEqual(nesterov["optimizer"], "nesterov")
    self.assertEqual((nesterov["seeds"], nesterov["finished_seeds"]),
                     ("3", "2"))
    self.assertAlmostEqual(float(nesterov["final_test_error_mean"]),
                           np.mean(final))
    self.assertAlmostEqual(float(nesterov["final_test_error_std"]),
                           np.std(final, ddof=1))
    self.assertEqual(rows[0]["final_validation_error_mean"], "")
    self.assertLen(nesterov["run_dirs"].split(";"), 3)

    with open(written.markdown) as f:
      markdown = f.read()
    self.assertIn("ddof = 1", markdown)
    expected = (f"| cifar10 | wrn-10-1 | nesterov |   | 3.00 | 3 | 2 | "
                f"{np.mean(final):.2f} ± {np.std(final, ddof=1):.2f} |")
    self.assertIn(expected, markdown)
    self.assertIn("| entropy_sgd (L=2) |", markdown)
    self.assertIn("final validation error (%)", markdown)
    self.assertIn("![cifar10_wrn-10-1.png](cifar10_wrn-10-1.png)", markdown)

    self.assertEqual(written.plots,
                     [os.path.join(output_dir, "cifar10_wrn-10-1.png")])
    with open(written.plots[0], "rb") as f:
      self.assertEqual(f.read(8), PNG_MAGIC)

  def test_one_plot_per_dataset_and_model(self):
    for dataset in ("cifar10", "cifar100"):
      write_fake_run(os.path.join(self.runs_dir, dataset),
                     make_config(dataset=dataset), [0.3, 0.5])
    written = results.write_results([self.runs_dir],
                                    os.path.join(self.root, "out"))
    self.assertEqual([os.path.basename(p) for p in written.plots],
                     ["cifar10_wrn-10-1.png", "cifar100_wrn-10-1.png"])

  def test_budgets_join_groups_that_differ_only_in_their_schedule(self):
    # Nesterov at 2 and 4 epochs (2 seeds at 4), Entropy-SGD at 2 only.
    for name, epochs, seed, accuracies in (
        ("n2", 2, 0, [0.6, 0.7]), ("n4a", 4, 0, [0.6, 0.7, 0.8, 0.9]),
        ("n4b", 4, 1, [0.6, 0.7, 0.8, 0.7])):
      write_fake_run(os.path.join(self.runs_dir, name),
                     make_config(opt="nesterov", epochs=epochs, seed=seed,
                                 lr_decay_epochs=(epochs // 2,)),
                     accuracies, validation_accuracies=accuracies)
    write_fake_run(os.path.join(self.runs_dir, "e2"),
                   make_config(opt="entropy_sgd", epochs=2), [0.5, 0.6],
                   validation_accuracies=[0.5, 0.6])
    groups = results.group_runs([results.load_run(d) for d in
                                 results.expand_run_dirs([self.runs_dir])])
    points = results.budget_points(groups)
    self.assertEqual(list(points), [("cifar10", "wrn-10-1", "validation")])
    families = points[("cifar10", "wrn-10-1", "validation")]
    self.assertEqual(sorted(families), ["entropy_sgd (L=20)", "nesterov"])
    nesterov = families["nesterov"]
    epoch = TRAIN_EXAMPLES // BATCH_SIZE * BATCH_SIZE / TRAIN_EXAMPLES
    self.assertEqual([p.seeds for p in nesterov], [1, 2])
    self.assertAlmostEqual(nesterov[0].effective_epochs, 2 * epoch)
    self.assertAlmostEqual(nesterov[1].effective_epochs, 4 * epoch)
    self.assertAlmostEqual(nesterov[0].error_mean, 30.0, places=4)
    self.assertAlmostEqual(nesterov[1].error_mean, 20.0, places=4)
    self.assertAlmostEqual(nesterov[1].error_std,
                           float(np.std([10.0, 30.0], ddof=1)), places=4)
    written = results.write_results([self.runs_dir],
                                    os.path.join(self.root, "out"))
    self.assertIn("cifar10_wrn-10-1_budgets.png",
                  [os.path.basename(p) for p in written.plots])
    # One budget per family: no budget plot.
    single = os.path.join(self.root, "single")
    write_fake_run(os.path.join(single, "a"), make_config(), [0.3, 0.5])
    self.assertEqual(results.budget_points(results.group_runs(
        [results.load_run(os.path.join(single, "a"))])), {})

  def test_settings_that_matter_and_those_that_do_not(self):
    base = dict(opt="sgd", lr=0.1, max_steps=None)
    variants = {
        "a": base,
        "b": dict(base, L=7, jit=True, log_every_steps=3),  # Unread, ignored.
        "c": dict(base, lr=0.05),
        "d": dict(base, max_steps=20),
    }
    for name, overrides in variants.items():
      write_fake_run(os.path.join(self.runs_dir, name),
                     make_config(**overrides), [0.3, 0.5])
    written = results.write_results([self.runs_dir],
                                    os.path.join(self.root, "out"))
    with open(written.csv) as f:
      rows = list(csv.DictReader(f))
    self.assertEqual(sorted((r["settings"], r["seeds"]) for r in rows),
                     [("lr=0.05, max_steps=None", "1"),
                      ("lr=0.1, max_steps=20", "1"),
                      ("lr=0.1, max_steps=None", "2")])
    with open(written.markdown) as f:
      self.assertIn(" ± — |", f.read())  # One seed: no std.

  def test_a_record_without_a_new_field_is_the_old_experiment(self):
    # Entropy-SGD runs recorded before --recalibration_augment existed
    # recalibrated un-augmented: they group with =False, not the default.
    new = make_config(opt="entropy_sgd")
    old = {k: v for k, v in new.items() if k != "recalibration_augment"}
    for name, config in (("new", new), ("old", old),
                         ("old_flag", dict(new, recalibration_augment=False))):
      write_fake_run(os.path.join(self.runs_dir, name), config, [0.3, 0.5])
    written = results.write_results([self.runs_dir],
                                    os.path.join(self.root, "out"))
    with open(written.csv) as f:
      rows = list(csv.DictReader(f))
    self.assertEqual(sorted(r["seeds"] for r in rows), ["1", "2"])

  def test_config_from_hparams_when_config_json_is_missing(self):
    config = make_config(opt="entropy_sgd", L=2, max_steps=4)
    old = write_fake_run(os.path.join(self.runs_dir, "old"), config,
                         [0.3, 0.5], write_config=False, write_hparams=True)
    new = write_fake_run(os.path.join(self.runs_dir, "new"),
                         dict(config, seed=1), [0.4, 0.6])
    run = results.load_run(old)
    self.assertEqual(run.config["L"], 2)
    self.assertIsInstance(run.config["L"], int)
    self.assertEqual(run.config["lr_decay_epochs"], (60, 120, 160))
    self.assertIsNone(run.config["run_name"])
    groups = results.group_runs([run, results.load_run(new)])
    self.assertLen(groups, 1)

  def test_wall_time_sums_segments_and_resume_replaces_points(self):
    run_dir = os.path.join(self.runs_dir, "resumed")
    write_raw_segment(run_dir, "1000", [1000.0, 1010.0, 1050.0, 1100.0], [
        (10, "progress/effective_epoch", 1.0),
        (20, "progress/effective_epoch", 2.0),
        (30, "test/accuracy", 0.9)])  # Lost: resumed from step 20.
    write_raw_segment(run_dir, "5000", [5000.0, 5020.0, 5050.0], [
        (30, "test/accuracy", 0.4),
        (30, "progress/effective_epoch", 3.0)])
    with open(os.path.join(run_dir, results.CONFIG_FILE), "w") as f:
      json.dump(make_config(), f)
    run = results.load_run(run_dir)
    self.assertAlmostEqual(run.wall_time_seconds, 100.0 + 50.0)
    epochs, values = run.scalars["test/accuracy"]
    np.testing.assert_allclose(epochs, [3.0])
    np.testing.assert_allclose(values, as_float32([0.4]))
    np.testing.assert_allclose(run.scalars["progress/effective_epoch"][0],
                               [1.0, 2.0, 3.0])
    row = results.summarize_group(results.group_runs([run])[0])
    self.assertEqual(chrono.format_duration(row.wall_time_seconds),
                     "0:02:30")

  def test_mean_curve_interpolates_onto_common_grid(self):
    x, mean, std = results.mean_curve([
        (np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0])),
        (np.array([1.5, 3.0, 4.0]), np.array([0.0, 30.0, 50.0]))])
    np.testing.assert_allclose(x, [1.5, 2.0, 3.0])  # Shared range only.
    first = np.array([[15.0, 20.0, 30.0], [0.0, 10.0, 30.0]])
    np.testing.assert_allclose(mean, first.mean(axis=0))
    np.testing.assert_allclose(std, first.std(axis=0, ddof=1))

    x, mean, std = results.mean_curve([(np.array([1.0]), np.array([5.0]))])
    np.testing.assert_allclose((x, mean), ([1.0], [5.0]))
    self.assertTrue(np.isnan(std).all())

  def test_paper_protocol_reads_the_mean_curve(self):
    # Adam on lenet-iclr17: Table 1 quotes 0.51% at effective epoch 100.
    # A fake epoch is one effective epoch: 120 evaluations, read at the one
    # nearest 100 and at the minimum of the seeds' mean.
    rng = np.random.default_rng(0)
    curves = {seed: list(0.99 - 0.001 * rng.random(120)) for seed in (0, 1)}
    for seed, accuracies in curves.items():
      write_fake_run(os.path.join(self.runs_dir, f"adam_seed{seed}"),
                     dataclasses.asdict(config_lib.from_preset(
                         "adam", "mnist", "lenet-iclr17", recipe="paper",
                         batch_size=BATCH_SIZE, seed=seed)), accuracies)
    write_fake_run(os.path.join(self.runs_dir, "nesterov_seed0"),
                   make_config(opt="nesterov"), [0.5, 0.6])
    runs = [results.load_run(d)
            for d in results.expand_run_dirs([self.runs_dir])]
    rows = {r.optimizer: r for r in map(results.summarize_group,
                                         results.group_runs(runs))}
    adam = rows["adam"]
    mean_error = 100 * (1 - np.mean([as_float32(c) for c in curves.values()],
                                    axis=0))
    self.assertEqual((adam.paper_error, adam.paper_epoch), (0.51, 100.0))
    self.assertAlmostEqual(adam.mean_curve_epoch_nearest_paper, 100.0)
    self.assertAlmostEqual(adam.mean_curve_error_at_paper_epoch,
                           mean_error[99], places=5)
    self.assertAlmostEqual(adam.mean_curve_min_error, mean_error.min(),
                           places=5)
    self.assertAlmostEqual(adam.mean_curve_min_epoch,
                           float(np.argmin(mean_error) + 1))
    self.assertTrue(math.isnan(rows["nesterov"].paper_error))  # Not in it.
    # A curve that stops short of the quoted epoch has no value there.
    self.assertTrue(math.isnan(results.paper_protocol(
        [(np.arange(1.0, 41.0), np.ones(40))], 100)[0]))
    markdown = open(results.write_markdown(
        list(rows.values()), os.path.join(self.root, "r.md"))).read()
    self.assertIn("By the paper's protocol", markdown)
    self.assertIn("0.51 ± 0.01 at 100", markdown)

  def test_paper_entry(self):
    paper = {"recipe": "paper"}
    self.assertEqual(results.paper_entry(
        {"dataset": "mnist", "model": "mnistfc-iclr17", "opt": "entropy_sgd",
         **paper}), (1.37, 0.03, 120))
    self.assertIsNone(results.paper_entry(
        {"dataset": "mnist", "model": "lenet", "opt": "nesterov", **paper}))
    self.assertEqual(results.paper_entry(
        {"dataset": "cifar10", "model": "allcnn", "opt": "nesterov",
         **paper})[2], 180)
    # The reference code's recipe is not the paper's experiment.
    self.assertIsNone(results.paper_entry(
        {"dataset": "mnist", "model": "mnistfc", "opt": "entropy_sgd",
         "recipe": "reference_code"}))

  def test_formatting(self):
    self.assertEqual(results.format_mean_std(12.345, 0.5, 3), "12.35 ± 0.50")
    self.assertEqual(results.format_mean_std(12.345, math.nan, 1),
                     "12.35 ± —")
    self.assertEqual(results.format_mean_std(math.nan, math.nan, 2), "n/a")

  def test_not_a_run_directory(self):
    empty = self.create_tempdir().full_path
    config_only = self.create_tempdir().full_path
    with open(os.path.join(config_only, results.CONFIG_FILE), "w") as f:
      json.dump(make_config(), f)
    events_only = os.path.join(self.root, "events_only")
    write_raw_segment(events_only, "1", [1.0, 2.0],
                      [(1, "progress/effective_epoch", 0.1)])
    cases = [
        (lambda: results.load_run(empty), empty, "no TensorBoard event"),
        (lambda: results.load_run(config_only), config_only,
         "no TensorBoard event"),
        (lambda: results.load_run(events_only), events_only,
         "no config.json and no hparams"),
        (lambda: results.expand_run_dirs([empty]), empty,
         "neither a run directory"),
        (lambda: results.expand_run_dirs([empty + "/missing"]),
         empty + "/missing", "no such directory"),
    ]
    for call, directory, message in cases:
      with self.assertRaises(ValueError) as raised:
        call()
      self.assertIsInstance(raised.exception, results.NotARunError)
      self.assertIn(directory, str(raised.exception))
      self.assertIn(message, str(raised.exception))
      self.assertNotIn("\n", str(raised.exception))

  def test_parent_expands_one_level_and_skips_non_runs(self):
    write_fake_run(os.path.join(self.runs_dir, "a"), make_config(), [0.5])
    os.makedirs(os.path.join(self.runs_dir, "plots"))
    direct = write_fake_run(os.path.join(self.root, "b"),
                            make_config(seed=1), [0.5])
    self.assertEqual(
        results.expand_run_dirs([self.runs_dir, direct, self.runs_dir]),
        [os.path.join(self.runs_dir, "a"), direct])


if __name__ == "__main__":
  absltest.main()
