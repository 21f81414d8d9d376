"""//launch:landscape on tiny real runs of //launch:mnist, as a user runs it.

The runs train in process (`run_in_process`); //launch:landscape runs as a
binary for the full report, the mirrored strategy and one error, and in
process (`run_landscape_in_process`) for the other errors.
"""

import json
import os
import shutil
import subprocess
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from entropy_sgd.train import checkpoints
from launch.launcher_testing import error_lines
from launch.launcher_testing import launcher_command
from launch.launcher_testing import launcher_env
from launch.launcher_testing import run_in_process
from launch.launcher_testing import run_landscape_in_process
from launch.launcher_testing import TESTDATA

MNIST = os.path.join(TESTDATA, "mnist")
# Small enough for a shared 2-core machine; every measure runs.
SMALL = ["--batches=2", "--top_k=3", "--lanczos_iterations=8", "--probes=4",
         "--density_probes=2", "--density_iterations=6", "--entropy_betas=2",
         "--entropy_steps=3", "--entropy_burn_in=1", "--sharpness_steps=3",
         "--direction_points=5", "--plane_points=3", "--adaptive_steps=2",
         "--adaptive_samples=2", "--pac_bayes_samples=2",
         "--pac_bayes_bisections=3",
         "--interpolation_points=5"]


def train(log_dir, name, *args):
  result = run_in_process(
      "mnist", "--model=mnistfc", "--batch_size=20", "--max_steps=3",
      f"--data_dir={MNIST}", f"--log_dir={log_dir}", f"--run_name={name}",
      "--recalibration_batches=1", *args)
  assert result.returncode == 0, result.stderr[-3000:]
  return os.path.join(log_dir, name)


def analyse(*args, cwd=None, working_directory=None):
  env = launcher_env(**({"BUILD_WORKING_DIRECTORY": working_directory}
                        if working_directory else {}))
  return subprocess.run(launcher_command("landscape") + list(args),
                        capture_output=True, text=True, timeout=900, env=env,
                        cwd=cwd)


class LandscapeLauncherTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    log_dir = os.path.join(cls.root, "runs")
    cls.sgd = train(log_dir, "sgd", "--opt=sgd")
    entropy_sgd = ["--opt=entropy_sgd", "--L=2", "--deterministic"]
    cls.entropy_sgd = train(log_dir, "entropy_sgd", *entropy_sgd,
                            "--track_flatness_every_steps=1")
    cls.untracked = train(log_dir, "untracked", *entropy_sgd)
    # Relative paths resolve against where `bazel run` was called from.
    cls.output_dir = os.path.join(cls.root, "flat")
    cls.result = analyse(
        "--run_dir=runs/sgd", "--compare=runs/entropy_sgd",
        "--output_dir=flat", f"--data_dir={os.path.relpath(MNIST, cls.root)}",
        *SMALL, working_directory=cls.root)
    assert cls.result.returncode == 0, cls.result.stderr[-3000:]
    with open(os.path.join(cls.output_dir, "landscape.json")) as f:
      cls.report = json.load(f)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def test_report_holds_every_measure(self):
    r = self.report
    self.assertEqual((r["model"], r["dataset"], r["examples"]),
                     ("mnistfc", "mnist", 40))
    self.assertEqual(r["batch_norm_recalibration"], "un-augmented")
    self.assertEqual(r["checkpoint"],
                     os.path.join(self.sgd, "checkpoints", "ckpt-3"))
    top = r["hessian_top_eigenvalues"]
    self.assertLen(top, 3)
    self.assertEqual(top, sorted(top, reverse=True))
    self.assertGreater(top[0], 0)
    self.assertLen(r["hessian_top_eigenvalue_residuals"], 3)
    self.assertTrue(np.isfinite(r["hessian_trace"]))
    self.assertGreater(r["hessian_trace_stderr"], 0)
    density = r["hessian_density"]
    grid = np.array(density["grid"])
    mass = np.sum(density["density"]) * (grid[1] - grid[0])
    self.assertAlmostEqual(mass, 1.0, delta=0.02)
    for key in ("local_entropy", "local_entropy_stderr",
                "local_entropy_deficit"):
      self.assertTrue(np.isfinite(r[key]), key)
    self.assertGreaterEqual(r["epsilon_sharpness"], 0.0)
    self.assertGreaterEqual(r["epsilon_sharpness_max_loss"], r["loss"])
    # Every curve passes through x at a = 0 (b = 0) with f(x) itself.
    line, plane = r["direction_1d"], r["direction_2d"]
    self.assertEqual(line["alphas"][2], 0.0)
    self.assertAlmostEqual(line["loss"][2], r["loss"], places=5)
    self.assertAlmostEqual(plane["loss"][1][1], r["loss"], places=5)
    self.assertEqual(np.shape(plane["accuracy"]), (3, 3))
    interpolation = r["interpolation"]
    self.assertEqual(interpolation["alphas"], [-0.5, 0.0, 0.5, 1.0, 1.5])
    self.assertAlmostEqual(interpolation["loss"][1], r["loss"], places=5)
    self.assertEqual(interpolation["compare_optimizer"], "entropy_sgd")

  def test_writes_markdown_and_plots_and_logs_an_eta(self):
    for name in ["landscape.md"] + list(self.report["plots"].values()):
      path = os.path.join(self.output_dir, name)
      self.assertIn(f"wrote {path}", self.result.stdout)
      if name.endswith(".png"):
        with open(path, "rb") as f:
          self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    self.assertCountEqual(self.report["plots"], [
        "density", "direction_1d", "direction_2d", "interpolation"])
    with open(os.path.join(self.output_dir, "landscape.md")) as f:
      markdown = f.read()
    self.assertIn("top Hessian eigenvalues", markdown)
    self.assertIn("![interpolation](interpolation.png)", markdown)
    self.assertIn("ETA", self.result.stderr)
    self.assertIn("landscape: lambda_max", self.result.stdout)

  def test_mirrored_strategy_sums_over_replicas(self):
    output_dir = os.path.join(self.root, "mirrored")
    result = analyse(f"--run_dir={self.sgd}", f"--output_dir={output_dir}",
                     f"--data_dir={MNIST}", "--measures=eigenvalues,trace",
                     "--strategy=mirrored", "--num_devices=2", *SMALL)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    with open(os.path.join(output_dir, "landscape.json")) as f:
      mirrored = json.load(f)
    self.assertEqual(mirrored["replicas"], 2)
    self.assertNotIn("local_entropy", mirrored)
    # Same examples and probes; only BatchNorm statistics differ a little
    # (the mean of two half-batch estimates).
    self.assertAlmostEqual(mirrored["loss"], self.report["loss"], delta=0.05)
    np.testing.assert_allclose(mirrored["hessian_top_eigenvalues"][0],
                               self.report["hessian_top_eigenvalues"][0],
                               rtol=0.15)
    np.testing.assert_allclose(mirrored["hessian_trace"],
                               self.report["hessian_trace"], rtol=0.15)

  def test_training_tracks_flatness_without_changing_the_run(self):
    scalars = {}
    for name in os.listdir(self.entropy_sgd):
      if not name.startswith("events"):
        continue
      path = os.path.join(self.entropy_sgd, name)
      for event in tf.compat.v1.train.summary_iterator(path):
        for value in event.summary.value:
          if value.tag.startswith("flatness/"):
            scalars.setdefault(value.tag, []).append(
                (event.step, float(tf.make_ndarray(value.tensor))))
    self.assertCountEqual(scalars, ["flatness/lambda_max",
                                    "flatness/hessian_trace"])
    for series in scalars.values():  # Outer steps 1..3 x L = 2.
      self.assertEqual([step for step, _ in series], [2, 4, 6])
      self.assertTrue(np.all(np.isfinite([v for _, v in series])))
    self.assertGreater(scalars["flatness/lambda_max"][-1][1], 0.0)
    tracked = checkpoints.checkpoint_model_variables(self.entropy_sgd)
    untracked = checkpoints.checkpoint_model_variables(self.untracked)
    self.assertCountEqual(tracked, untracked)
    for name, value in tracked.items():
      np.testing.assert_array_equal(value, untracked[name], err_msg=name)

  def test_bad_tracking_interval_is_one_line(self):
    result = run_in_process("mnist", "--track_flatness_every_steps=0",
                            f"--data_dir={MNIST}",
                            f"--log_dir={os.path.join(self.root, 'bad')}")
    self.assertEqual(result.returncode, 1)
    errors = error_lines(result)
    self.assertLen(errors, 1, result.stderr[-2000:])
    self.assertIn("--track_flatness_every_steps must be >= 1", errors[0])

  def fake_run(self, name, model=None, checkpoints=True):
    """A copy of the SGD run, optionally claiming another model."""
    path = os.path.join(self.root, name)
    shutil.copytree(self.sgd, path)
    if not checkpoints:
      shutil.rmtree(os.path.join(path, "checkpoints"))
    if model:
      with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
      config["model"] = model
      with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path

  @parameterized.named_parameters(
      ("not_a_run_dir", "not_a_run_dir", "is not a run directory"),
      ("no_checkpoint", "no_checkpoint", "has no checkpoint"),
      ("damaged_checkpoints", "damaged_checkpoints",
       "can be resumed from: ckpt-3 (it does not read back"),
      ("compare_mismatch", "compare_mismatch",
       "interpolating needs the same model"),
      ("missing_run_dir", "missing_run_dir", "--run_dir is required"),
  )
  def test_errors_are_one_line(self, case, message):
    if case == "not_a_run_dir":
      empty = os.path.join(self.root, "empty")
      os.makedirs(empty, exist_ok=True)
      args = [f"--run_dir={empty}"]
    elif case == "no_checkpoint":
      args = [f"--run_dir={self.fake_run(case, checkpoints=False)}"]
    elif case == "damaged_checkpoints":
      run = self.fake_run(case)
      for name in os.listdir(os.path.join(run, "checkpoints")):
        if ".data-" in name:
          with open(os.path.join(run, "checkpoints", name), "r+b") as f:
            f.truncate(50)
      before = sorted(os.listdir(os.path.join(run, "checkpoints")))
      args = [f"--run_dir={run}"]
    elif case == "compare_mismatch":
      args = [f"--run_dir={self.sgd}",
              f"--compare={self.fake_run(case, model='lenet')}"]
    else:
      args = []
    output_dir = os.path.join(self.root, f"out_{case}")
    # One error through the binary (the line as a shell sees it), the rest
    # in process.
    run = analyse if case == "missing_run_dir" else run_landscape_in_process
    result = run(*args, f"--output_dir={output_dir}", f"--data_dir={MNIST}",
                 *SMALL)
    self.assertEqual(result.returncode, 1)
    self.assertNotIn("Traceback", result.stderr)
    errors = error_lines(result)
    self.assertLen(errors, 1, result.stderr[-2000:])
    self.assertIn(message, errors[0])
    self.assertFalse(os.path.exists(os.path.join(output_dir,
                                                 "landscape.json")))
    if case == "damaged_checkpoints":  # The tool never moves a file.
      self.assertEqual(sorted(os.listdir(os.path.join(args[0].split("=")[1],
                                                      "checkpoints"))),
                       before)


if __name__ == "__main__":
  absltest.main()
