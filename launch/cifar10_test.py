"""The launchers as a user runs them: help, smoke runs and bad input.

Each case checks the real launcher's exit code and output: errors are one
line, without a Python traceback, and come before any training starts. Most
cases run the launcher's `run` in process (`run_in_process`: its flags,
presets and exit, without a new TensorFlow process); `--help`, a smoke run
of each binary and one case per way out of it run in a subprocess.
"""

import json
import os
import shutil

from absl.testing import absltest
from absl.testing import parameterized
import tensorflow as tf

from entropy_sgd.core import distribution
from launch.launcher_testing import error_lines
from launch.launcher_testing import run_in_process
from launch.launcher_testing import run_launcher
from launch.launcher_testing import TESTDATA

CIFAR10 = os.path.join(TESTDATA, "cifar10")


TINY = ["--model=wrn-10-1", "--batch_size=20", "--log_every_steps=1",
        "--recalibration_batches=1"]


def setUpModule():
  # Two logical CPUs before TensorFlow starts, for the in-process Parle run
  # on two devices; one-device runs use the first.
  distribution.logical_cpus(2)


class LauncherTest(parameterized.TestCase):

  def test_help_lists_flags_and_presets(self):
    result = run_launcher("cifar10", "--helpfull")
    self.assertIn(result.returncode, (0, 1), result.stderr)  # absl: 1.
    for text in ("--opt", "--L", "--langevin_lr", "--conventions",
                 "wrn/entropy_sgd: 10", "allcnn/sgd: 200", "--data_dir",
                 "--model=allcnn --opt=entropy_sgd: epochs=10", "--max_steps", "--tpu",
                 "multi_worker", "sync_batch_norm"):
      self.assertIn(text, result.stdout)

  @parameterized.parameters(("cifar10", "entropy_sgd"),
                            ("cifar100", "nesterov"))
  def test_smoke_run(self, dataset, opt):
    log_dir = self.create_tempdir().full_path
    data_dir = os.path.join(TESTDATA, dataset + "_gz")
    # A subprocess: the binaries as a user starts them.
    result = run_launcher(dataset, f"--opt={opt}", "--L=2", "--max_steps=2",
                          f"--data_dir={data_dir}", f"--log_dir={log_dir}",
                          *TINY)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn("summary: outer_steps=2", result.stdout)
    self.assertRegex(result.stderr, r"ETA \d+:\d\d:\d\d")
    run_dir = os.path.join(log_dir, os.listdir(log_dir)[0])
    self.assertTrue(os.path.exists(os.path.join(run_dir, "checkpoints",
                                                "checkpoint")))
    self.assertTrue(any(name.startswith("events.out.tfevents")
                        for name in os.listdir(run_dir)))

  @parameterized.parameters("mixed_bfloat16", "mixed_float16")
  def test_mixed_precision_keeps_float32_state(self, precision):
    log_dir = self.create_tempdir().full_path
    result = run_in_process(
        "cifar10", "--opt=entropy_sgd", f"--precision={precision}", "--L=2",
        "--max_steps=2", f"--data_dir={os.path.join(TESTDATA, 'cifar10')}",
        f"--log_dir={log_dir}", *TINY)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn("summary: outer_steps=2", result.stdout)
    run_dir = os.path.join(
        log_dir, f"cifar10_wrn-10-1_entropy_sgd_L2_seed0_{precision}")
    dtypes = tf.train.load_checkpoint(os.path.join(
        run_dir, "checkpoints")).get_variable_to_dtype_map()
    for prefix in ("model/", "optimizer/anchor/", "optimizer/mean/",
                   "optimizer/inner_velocities/"):
      floats = {dtype for name, dtype in dtypes.items()
                if name.startswith(prefix) and dtype.is_floating}
      self.assertEqual(floats, {tf.float32}, prefix)
    self.assertEqual(
        "loss_scale/scale/.ATTRIBUTES/VARIABLE_VALUE" in dtypes,
        precision == "mixed_float16")

  def test_allcnn_smoke_run(self):
    log_dir = self.create_tempdir().full_path
    result = run_in_process(
        "cifar10", "--model=allcnn", "--max_steps=1", "--batch_size=20",
        f"--data_dir={os.path.join(TESTDATA, 'cifar10')}",
        f"--log_dir={log_dir}")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn("summary: outer_steps=1", result.stdout)
    self.assertTrue(os.path.exists(os.path.join(
        log_dir, "cifar10_allcnn_nesterov_seed0", "checkpoints",
        "ckpt-1.index")))

  @parameterized.parameters("nesterov", "entropy_sgd")
  def test_paper_recipe_whitens_and_does_not_augment(self, opt):
    log_dir = self.create_tempdir().full_path
    result = run_in_process(
        "cifar10", "--recipe=paper", "--model=allcnn", f"--opt={opt}",
        "--L=2", "--max_steps=1", "--batch_size=20",
        f"--data_dir={os.path.join(TESTDATA, 'cifar10')}",
        f"--log_dir={log_dir}")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn("summary: outer_steps=1", result.stdout)
    self.assertIn("GCN + ZCA whitening fitted on the 200 training images",
                  result.stderr)
    (run_dir,) = os.listdir(log_dir)
    with open(os.path.join(log_dir, run_dir, "config.json")) as f:
      config = json.load(f)
    self.assertEqual((config["preprocess"], config["augment"],
                      config["init"], config["recipe"]),
                     ("gcn_zca", "none", "torch", "paper"))

  @parameterized.parameters(([], "sam"), (["--sam_adaptive"], "asam"))
  def test_sam_smoke_run(self, extra, name):
    log_dir = self.create_tempdir().full_path
    result = run_in_process(
        "cifar10", "--opt=sam", *extra, "--max_steps=3", *TINY,
        f"--data_dir={os.path.join(TESTDATA, 'cifar10')}",
        f"--log_dir={log_dir}")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    # 3 steps of 2 gradient evaluations of 20 images: 0.3 epochs of 200.
    self.assertIn("summary: outer_steps=3, effective_epochs=0.6", result.stdout)
    run_dir = os.path.join(log_dir, f"cifar10_wrn-10-1_{name}_seed0")
    self.assertTrue(os.path.exists(os.path.join(run_dir, "checkpoints",
                                                "ckpt-3.index")))
    self.assertTrue(any(n.startswith("events.out.tfevents")
                        for n in os.listdir(run_dir)))
    with open(os.path.join(run_dir, "config.json")) as f:
      config = json.load(f)
    self.assertEqual((config["opt"], config["sam_adaptive"]),
                     ("sam", name == "asam"))

  def test_parle_on_two_devices(self):
    log_dir = self.create_tempdir().full_path
    result = run_in_process(
        "cifar10", "--opt=entropy_sgd", "--parle", "--rho=1",
        "--strategy=mirrored", "--num_devices=2", "--L=2", "--max_steps=2",
        f"--data_dir={os.path.join(TESTDATA, 'cifar10')}",
        f"--log_dir={log_dir}", *TINY)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn("summary: outer_steps=2", result.stdout)
    self.assertIn("2 replica(s)", result.stderr)

  def test_relative_paths_follow_the_working_directory(self):
    # `bazel run` starts the launcher in its runfiles; relative paths the
    # user typed must resolve against BUILD_WORKING_DIRECTORY instead.
    work = self.create_tempdir().full_path
    shutil.copytree(os.path.join(TESTDATA, "cifar10"),
                    os.path.join(work, "data"))
    result = run_in_process("cifar10", "--opt=sgd", "--max_steps=1",
                            "--data_dir=data", "--log_dir=runs", *TINY,
                            env={"BUILD_WORKING_DIRECTORY": work})
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertTrue(os.path.isdir(os.path.join(work, "runs")))

  def assert_one_line_and_no_run(self, result, message, log_dir):
    self.assertNotEqual(result.returncode, 0)
    self.assertNotIn("Traceback", result.stderr)
    errors = error_lines(result)
    self.assertLen(errors, 1, result.stderr[-2000:])
    self.assertRegex(errors[0], message)
    self.assertEmpty(os.listdir(log_dir))  # No run directory is left.

  @parameterized.named_parameters(
      # Both ways out of a launcher: its own `error:` line, absl's flag error.
      ("config_error", ["--opt=entropy_sgd", "--L=0"], "--L must be >= 1"),
      ("flag_parsing", ["--opt=rmsprop"], "--opt"),
  )
  def test_bad_input_is_one_line_from_the_binary(self, args, message):
    log_dir = self.create_tempdir().full_path
    result = run_launcher("cifar10", f"--log_dir={log_dir}",
                          f"--data_dir={CIFAR10}", *args)
    self.assertEqual(result.returncode, 1)
    self.assert_one_line_and_no_run(result, message, log_dir)

  # The rest in process (`run_in_process`: the binary's flags and exit, no
  # new process); settings config.validate refuses are in config_test.
  @parameterized.named_parameters(
      ("batch_not_divisible", ["--strategy=mirrored", "--num_devices=2",
                               "--batch_size=7"], "not divisible by the 2"),
      ("missing_data", ["--data_dir=/nonexistent/cifar"], "--data_dir"),
      ("multi_worker_without_tf_config", ["--strategy=multi_worker"],
       "--strategy=multi_worker needs the TF_CONFIG environment variable"),
      ("no_tpu", ["--strategy=tpu"], "--strategy=tpu: no TPU found .*--tpu"),
      ("sync_batch_norm_jit_on_cpus", ["--strategy=mirrored",
                                       "--num_devices=2", "--sync_batch_norm",
                                       "--jit"],
       "--sync_batch_norm with --jit needs GPUs"),
  )
  def test_bad_input_is_one_line(self, args, message):
    log_dir = self.create_tempdir().full_path
    data_args = ([] if any(a.startswith("--data_dir") for a in args)
                 else [f"--data_dir={CIFAR10}"])
    result = run_in_process("cifar10", f"--log_dir={log_dir}", *data_args,
                            *args)
    self.assertEqual(result.returncode, 1)
    self.assert_one_line_and_no_run(result, message, log_dir)

  @parameterized.named_parameters(
      ("not_json", "{cluster", "invalid TF_CONFIG"),
      ("no_task", '{"cluster": {"worker": ["localhost:1"]}}',
       "invalid TF_CONFIG \\(missing 'task'\\)"),
      ("index_outside", '{"cluster": {"worker": ["localhost:1"]}, '
       '"task": {"type": "worker", "index": 3}}', "task index 3 is outside"),
  )
  def test_invalid_tf_config_is_one_line(self, tf_config, message):
    log_dir = self.create_tempdir().full_path
    result = run_in_process(
        "cifar10", "--strategy=multi_worker", f"--log_dir={log_dir}",
        f"--data_dir={CIFAR10}", tf_config=tf_config)
    self.assertEqual(result.returncode, 1)
    self.assert_one_line_and_no_run(result, message, log_dir)

  def test_truncated_data_file(self):
    data_dir = self.create_tempdir().full_path
    shutil.copytree(os.path.join(CIFAR10, "cifar-10-batches-bin"),
                    os.path.join(data_dir, "cifar-10-batches-bin"))
    victim = os.path.join(data_dir, "cifar-10-batches-bin",
                          "data_batch_3.bin")
    with open(victim, "r+b") as f:
      f.truncate(os.path.getsize(victim) - 100)
    log_dir = self.create_tempdir().full_path
    result = run_in_process("cifar10", f"--data_dir={data_dir}",
                            f"--log_dir={log_dir}")
    self.assertEqual(result.returncode, 1)
    self.assert_one_line_and_no_run(result, "data_batch_3.bin", log_dir)

  def test_unwritable_log_dir(self):
    blocker = self.create_tempfile().full_path
    result = run_in_process("cifar10", f"--data_dir={CIFAR10}",
                            f"--log_dir={blocker}/runs")
    self.assertEqual(result.returncode, 1)
    self.assertRegex(error_lines(result)[0], "--log_dir: cannot write")


if __name__ == "__main__":
  absltest.main()
