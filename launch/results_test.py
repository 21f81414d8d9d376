"""The results tool on real runs: two seeds of the real launcher.

Trains two tiny CIFAR-10 runs (--seeds=0,1) with launch/cifar10 as
cifar10_test does, then runs launch/results as `bazel run` would, from
another directory with relative paths; bad input ends with one `error:`
line.
"""

import csv
import os
import re
import subprocess

from absl.testing import absltest
import numpy as np

from launch.launcher_testing import launcher_command
from launch.launcher_testing import launcher_env
from launch.launcher_testing import TESTDATA

TINY = ["--model=wrn-10-1", "--batch_size=20", "--max_steps=2",
        "--log_every_steps=1", "--recalibration_batches=1", "--opt=nesterov"]


def run_binary(name, *args, **env_overrides):
  return subprocess.run(
      launcher_command(name) + list(args), capture_output=True, text=True,
      timeout=600, env=launcher_env(**env_overrides))


def final_test_accuracies(launcher_stdout):
  """One per seed, from the launcher's `summary: ...` lines."""
  return [float(a) for a in re.findall(r"final_test_accuracy=([0-9.e-]+)",
                                       launcher_stdout)]


class ResultsToolTest(absltest.TestCase):

  def test_two_seeds_of_the_real_launcher(self):
    work = self.create_tempdir().full_path
    log_dir = os.path.join(work, "runs")
    trained = run_binary(
        "cifar10", *TINY, "--seeds=0,1", f"--log_dir={log_dir}",
        f"--data_dir={os.path.join(TESTDATA, 'cifar10_gz')}")
    self.assertEqual(trained.returncode, 0, trained.stderr[-3000:])
    accuracies = final_test_accuracies(trained.stdout)
    self.assertLen(accuracies, 2)

    # `bazel run` starts in the runfiles; paths are relative to the caller.
    result = run_binary("results", "--output_dir=out", "runs",
                        BUILD_WORKING_DIRECTORY=work)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    output_dir = os.path.join(work, "out")
    self.assertIn(f"wrote {os.path.join(output_dir, 'results.md')}",
                  result.stdout)
    with open(os.path.join(output_dir, "results.csv")) as f:
      rows = list(csv.DictReader(f))
    self.assertLen(rows, 1)
    row = rows[0]
    self.assertEqual((row["dataset"], row["model"], row["optimizer"]),
                     ("cifar10", "wrn-10-1", "nesterov"))
    self.assertEqual((row["seeds"], row["finished_seeds"]), ("2", "0"))
    errors = 100 * (1 - np.array(accuracies))
    self.assertAlmostEqual(float(row["final_test_error_mean"]),
                           np.mean(errors), places=4)
    self.assertAlmostEqual(float(row["final_test_error_std"]),
                           np.std(errors, ddof=1), places=4)
    self.assertGreater(float(row["effective_epochs"]), 0)
    self.assertGreater(float(row["wall_time_seconds"]), 0)
    with open(os.path.join(output_dir, "cifar10_wrn-10-1.png"), "rb") as f:
      self.assertEqual(f.read(4), b"\x89PNG")

  def test_bad_input_is_one_line(self):
    not_a_run = self.create_tempdir().full_path
    output_dir = os.path.join(self.create_tempdir().full_path, "out")
    for args, message in (
        ([f"--output_dir={output_dir}", not_a_run],
         f"error: {re.escape(not_a_run)}: neither a run directory"),
        ([not_a_run], "error: --output_dir is required"),
        ([f"--output_dir={output_dir}"],
         "error: name at least one run directory")):
      result = run_binary("results", *args)
      self.assertNotEqual(result.returncode, 0)
      self.assertNotIn("Traceback", result.stderr)
      errors = [line for line in result.stderr.splitlines()
                if line.startswith("error:")]
      self.assertLen(errors, 1, result.stderr[-2000:])
      self.assertRegex(errors[0], message)
    self.assertFalse(os.path.exists(output_dir))


if __name__ == "__main__":
  absltest.main()
