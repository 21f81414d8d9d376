"""Kendall's tau against brute force, and the report on fake measured runs."""

import itertools
import json
import math
import os

from absl.testing import absltest
import numpy as np

from entropy_sgd.reports import flatness_report


def brute_force_tau_b(x, y):
  """tau-b from its definition, pair by pair."""
  n_c = n_d = t_x = t_y = 0
  for i, j in itertools.combinations(range(len(x)), 2):
    dx, dy = x[i] - x[j], y[i] - y[j]
    if dx * dy > 0:
      n_c += 1
    elif dx * dy < 0:
      n_d += 1
    elif dx == 0 and dy != 0:
      t_x += 1
    elif dy == 0 and dx != 0:
      t_y += 1
  return (n_c - n_d) / math.sqrt((n_c + n_d + t_x) * (n_c + n_d + t_y))


def write_measured(root, name, opt, seed, test_accuracy, train_accuracy,
                   trace, epochs=19.968, validation_accuracy=None,
                   recalibration=None, landscape_heldout=None, **settings):
  path = os.path.join(root, name)
  for sub in ("flatness", "train"):
    os.makedirs(os.path.join(path, sub))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"dataset": "mnist", "model": "lenet", "opt": opt, "L": 20,
               "seed": seed, "precision": "float32", **settings}, f)
  summary = {"final_test_accuracy": test_accuracy, "effective_epochs": epochs}
  if validation_accuracy is not None:
    summary["final_validation_accuracy"] = validation_accuracy
  with open(os.path.join(path, "summary.json"), "w") as f:
    json.dump(summary, f)
  with open(os.path.join(path, "flatness", "landscape.json"), "w") as f:
    json.dump({"hessian_top_eigenvalues": [2 * trace], "hessian_trace": trace,
               "epsilon_sharpness": 1.0, "adaptive_sharpness_worst": trace,
               "adaptive_sharpness_average": -trace,
               "pac_bayes_flatness": 3.0}, f)
  train = {"accuracy": train_accuracy}
  if recalibration:
    train["batch_norm_recalibration"] = recalibration
  if landscape_heldout is not None:  # (split, accuracy) as landscape writes.
    train["heldout_split"], train["heldout_accuracy"] = landscape_heldout
  with open(os.path.join(path, "train", "landscape.json"), "w") as f:
    json.dump(train, f)
  return path


class KendallTest(absltest.TestCase):

  def test_matches_the_definition_with_and_without_ties(self):
    rng = np.random.default_rng(0)
    for _ in range(20):
      x = rng.integers(0, 4, size=9).astype(float)
      y = rng.integers(0, 4, size=9).astype(float)
      if len(set(x)) < 2 or len(set(y)) < 2:
        continue
      self.assertAlmostEqual(flatness_report.kendall_tau(x, y),
                             brute_force_tau_b(x, y))
    self.assertEqual(flatness_report.kendall_tau([1, 2, 3], [4, 5, 6]), 1.0)
    self.assertEqual(flatness_report.kendall_tau([1, 2, 3], [6, 5, 4]), -1.0)

  def test_bootstrap_of_a_perfect_order(self):
    low, high = flatness_report.bootstrap_interval(range(8), range(8))
    self.assertEqual((low, high), (1.0, 1.0))


class ReportTest(absltest.TestCase):

  def test_report_on_fake_runs(self):
    root = self.create_tempdir().full_path
    paths = [
        write_measured(root, "a0", "nesterov", 0, 0.990, 1.000, 1.0),
        write_measured(root, "a1", "nesterov", 1, 0.992, 1.000, 2.0),
        write_measured(root, "b0", "entropy_sgd", 0, 0.995, 0.999, 3.0),
        write_measured(root, "b1", "entropy_sgd", 1, 0.994, 0.999, 5.0)]
    out = os.path.join(root, "out")
    written = flatness_report.write_report(paths, out)
    runs = [flatness_report.load(p) for p in paths]
    self.assertAlmostEqual(runs[0].gap, 1.0)  # 1.0 - 0.0 points.
    self.assertAlmostEqual(runs[2].gap, 0.4)
    with open(written[0]) as f:
      text = f.read()
    # The table's tau is the definition's, from the runs' own numbers.
    gaps = [r.gap for r in runs]
    traces = [r.measures["hessian_trace"] for r in runs]
    tau = brute_force_tau_b(traces, gaps)
    self.assertIn(f"| mnist | 4 | hessian_trace | {tau:.3g} |", text)
    # Entropy-SGD minus Nesterov on the trace: 4 - 1.5 = 2.5.
    self.assertIn("| mnist | lenet | reference_code | he | 20 | nesterov | ",
                  text)
    self.assertIn("| 2.5 ± ", text)
    self.assertTrue(os.path.exists(os.path.join(out, "flatness.csv")))
    self.assertTrue(os.path.exists(os.path.join(out,
                                                "mnist_hessian_trace.png")))

  def test_budgets_are_experiments_and_validation_is_held_out(self):
    root = self.create_tempdir().full_path
    paths = [
        write_measured(root, "a", "nesterov", 0, 0.70, 0.95, 1.0,
                       validation_accuracy=0.90),
        write_measured(root, "b", "nesterov", 1, 0.71, 0.96, 2.0,
                       epochs=99.84, validation_accuracy=0.92),
        write_measured(root, "c", "entropy_sgd", 0, 0.72, 0.97, 3.0,
                       epochs=99.84, validation_accuracy=0.91)]
    runs = [flatness_report.load(p) for p in paths]
    # The gap is validation error - training error: 10 - 5 points.
    self.assertEqual(runs[0].heldout_split, "validation")
    self.assertAlmostEqual(runs[0].gap, 5.0, places=4)
    self.assertAlmostEqual(runs[0].test_error, 30.0, places=4)
    self.assertEqual([r.budget for r in runs], [20, 100, 100])
    self.assertEqual(runs[0].recalibration, "un-augmented")  # Older JSON.
    out = os.path.join(root, "out")
    with open(flatness_report.write_report(paths, out)[0]) as f:
      text = f.read()
    self.assertIn("| mnist | lenet | reference_code | he | 20 | nesterov | 1 |",
                  text)
    self.assertIn("| mnist | lenet | reference_code | he | 100 | nesterov | 1 |",
                  text)
    # Entropy-SGD is compared with the baseline of its own budget only.
    self.assertEqual(text.count("| he | 100 | nesterov | "), 2)
    # A recipe that trains Entropy-SGD longer (the paper's) still compares.
    longer = os.path.join(root, "longer")
    pair = [write_measured(longer, "a", "adam", 0, 0.98, 0.99, 1.0),
            write_measured(longer, "b", "entropy_sgd", 0, 0.98, 0.99, 2.0,
                           epochs=199.68)]
    with open(flatness_report.write_report(pair, os.path.join(longer, "o"))[0]
              ) as f:
      self.assertIn("| he | 200 vs 20 | adam | ", f.read())
    with open(os.path.join(out, "flatness.csv")) as f:
      header = f.readline()
    self.assertIn("heldout_error", header)

  def test_settings_that_move_the_weights_tell_experiments_apart(self):
    root = self.create_tempdir().full_path
    paths = [
        write_measured(root, "n0", "nesterov", 0, 0.99, 1.0, 1.0, lr=0.1),
        write_measured(root, "n1", "nesterov", 1, 0.99, 1.0, 3.0, lr=0.1),
        write_measured(root, "h0", "nesterov", 0, 0.99, 1.0, 10.0, lr=0.05),
        # Evaluation settings only: one experiment of two seeds.
        write_measured(root, "e0", "entropy_sgd", 0, 0.99, 1.0, 4.0,
                       recalibration_augment=False),
        write_measured(root, "e1", "entropy_sgd", 1, 0.99, 1.0, 6.0,
                       recalibration_augment=True, recalibration_batches=5)]
    runs = [flatness_report.load(p) for p in paths]
    flatness_report.label_variants(runs)
    self.assertEqual([r.label for r in runs],
                     ["nesterov, lr=0.1", "nesterov, lr=0.1",
                      "nesterov, lr=0.05", "entropy_sgd (L=20)",
                      "entropy_sgd (L=20)"])
    with open(flatness_report.write_report(
        paths, os.path.join(root, "out"))[0]) as f:
      text = f.read()
    # Per experiment: the trace's mean over its own seeds only.
    self.assertIn("| 20 | nesterov, lr=0.1 | 2 | ", text)
    self.assertIn("| 20 | nesterov, lr=0.05 | 1 | ", text)
    self.assertIn("| 20 | entropy_sgd (L=20) | 2 | ", text)
    self.assertIn(" | 2 ± 1.4 | ", text)  # Traces 1 and 3, not 1, 3, 10.
    # Entropy-SGD against each baseline: trace 5 - 2 and 5 - 10.
    self.assertIn("| 20 | nesterov, lr=0.1 | 6 ± ", text)  # lambda_max.
    self.assertIn("| 20 | nesterov, lr=0.05 | -10 ± n/a | -5 ± n/a |", text)

  def test_gaps_of_different_recalibrations_are_not_ranked_together(self):
    root = self.create_tempdir().full_path
    paths = [write_measured(root, str(i), "nesterov", i, 0.9, 0.95, i,
                            recalibration=mode)
             for i, mode in enumerate(["augmented", "augmented",
                                       "un-augmented"])]
    with self.assertRaisesRegex(
        flatness_report.ReportError,
        r"^mnist: the runs' gaps are not comparable, their recalibration "
        r"differs \(augmented / un-augmented\); re-measure"):
      flatness_report.write_report(paths, os.path.join(root, "out"))

  def test_heldout_error_at_the_training_errors_statistics_first(self):
    root = self.create_tempdir().full_path
    at_landscape = flatness_report.load(write_measured(
        root, "a", "nesterov", 0, 0.70, 0.95, 1.0, validation_accuracy=0.90,
        landscape_heldout=("validation", 0.88)))
    self.assertEqual(at_landscape.heldout_source, "landscape")
    self.assertAlmostEqual(at_landscape.gap, 12.0 - 5.0, places=4)
    # A held-out pass of another split does not stand in for this one.
    other_split = flatness_report.load(write_measured(
        root, "b", "nesterov", 1, 0.70, 0.95, 1.0, validation_accuracy=0.90,
        landscape_heldout=("test", 0.70)))
    self.assertEqual(other_split.heldout_source, "summary")
    self.assertAlmostEqual(other_split.gap, 10.0 - 5.0, places=4)
    third = write_measured(root, "c", "nesterov", 2, 0.70, 0.95, 1.0,
                           validation_accuracy=0.90)
    with self.assertRaisesRegex(
        flatness_report.ReportError,
        r"^mnist: the runs' gaps are not comparable, their heldout_source "
        r"differs \(landscape / summary\); re-measure the runs' train/"):
      flatness_report.write_report(
          [at_landscape.path, other_split.path, third],
          os.path.join(root, "out"))

  def test_missing_measures_are_one_line(self):
    with self.assertRaisesRegex(flatness_report.ReportError,
                                "cannot read it"):
      flatness_report.load(self.create_tempdir().full_path)


if __name__ == "__main__":
  absltest.main()
