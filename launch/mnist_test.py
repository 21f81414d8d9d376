"""The MNIST launcher as a user runs it: smoke runs, seeds, loops, bad data.

The launcher's `run` runs in process (`run_in_process`: the binary's flags,
presets and exit, without a new TensorFlow process); one smoke run, `--help`
and one corrupt file go through the binary.
"""

import gzip
import json
import os
import shutil
import struct

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from entropy_sgd.core import noise
from entropy_sgd.train import checkpoints
from launch.launcher_testing import error_lines
from launch.launcher_testing import run_in_process
from launch.launcher_testing import run_launcher
from launch.launcher_testing import TESTDATA

# 200 training images in batches of 20: 10 outer steps per epoch.
TINY = ["--batch_size=20", "--log_every_steps=1", "--recalibration_batches=1"]
MNIST = os.path.join(TESTDATA, "mnist")


def copy_mnist(destination):
  shutil.copytree(MNIST, destination)
  return destination


class MnistLauncherTest(parameterized.TestCase):

  @parameterized.parameters(
      ("mnistfc", "entropy_sgd", "mnist", run_in_process),
      ("lenet", "entropy_sgd", "mnist_gz", run_launcher),  # The binary.
      ("lenet", "sgd", "mnist", run_in_process),
      ("mnistfc", "nesterov", "mnist_gz", run_in_process))
  def test_smoke_run(self, model, opt, folder, run):
    log_dir = self.create_tempdir().full_path
    result = run("mnist", f"--opt={opt}", f"--model={model}",
                          "--L=2", "--max_steps=5",
                          f"--data_dir={os.path.join(TESTDATA, folder)}",
                          f"--log_dir={log_dir}", *TINY)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn("summary: outer_steps=5", result.stdout)
    run_dir = os.path.join(log_dir, os.listdir(log_dir)[0])
    self.assertTrue(os.path.exists(os.path.join(run_dir, "checkpoints",
                                                "ckpt-5.index")))
    with open(os.path.join(run_dir, "config.json")) as f:
      config = json.load(f)
    self.assertEqual(config["model"], model)
    # The noise implementation this start resolved, logged and recorded.
    implementation = config["noise_implementation"]
    if opt == "entropy_sgd":
      # The launcher's own runfiles hold the kernel where this test's do.
      self.assertEqual(implementation, noise.resolve("auto").name)
      self.assertIn("Langevin noise: ", result.stderr)
      self.assertIn(config["noise_implementation_reason"], result.stderr)
    else:
      self.assertEqual(implementation, "none")

  @parameterized.product(model=("mnistfc-iclr17", "lenet-iclr17"),
                         opt=("adam", "entropy_sgd"))
  def test_paper_recipe_records_the_papers_values(self, model, opt):
    log_dir = self.create_tempdir().full_path
    result = run_in_process("mnist", "--recipe=paper", f"--opt={opt}",
                          f"--model={model}", "--max_steps=3",
                          f"--data_dir={MNIST}", f"--log_dir={log_dir}",
                          "--L=2" if opt == "entropy_sgd" else "--L=20",
                          *TINY)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn("summary: outer_steps=3", result.stdout)
    run_dir = os.path.join(log_dir, os.listdir(log_dir)[0])
    self.assertIn("_paper_", run_dir)
    with open(os.path.join(run_dir, "config.json")) as f:
      config = json.load(f)
    self.assertEqual((config["recipe"], config["init"], config["augment"]),
                     ("paper", "torch", "none"))
    if opt == "adam":
      self.assertEqual((config["lr"], config["dropout"]), (1e-3, 0.5))
    else:
      self.assertEqual(
          (config["dropout"], config["noise"], config["gamma"],
           config["scoping"], config["langevin_lr"]),
          ({"mnistfc-iclr17": 0.15, "lenet-iclr17": 0.25}[model], 1e-3,
           1e-4, 1e-3, 0.1))

  def test_paper_recipe_refuses_what_the_paper_did_not_run(self):
    result = run_in_process("mnist", "--recipe=paper", "--opt=nesterov",
                            f"--data_dir={MNIST}",
                            f"--log_dir={self.create_tempdir().full_path}")
    self.assertEqual(result.returncode, 1)
    self.assertEqual(error_lines(result), [
        "error: --recipe=paper: the paper ran no --opt=nesterov with "
        "--model=lenet-iclr17 on mnist (it ran --opt=adam/entropy_sgd "
        "there); use --recipe=reference_code."])

  @parameterized.parameters(("mnistfc", "mixed_bfloat16"),
                            ("lenet", "mixed_float16"))
  def test_mixed_precision_smoke_run(self, model, precision):
    log_dir = self.create_tempdir().full_path
    result = run_in_process("mnist", "--opt=nesterov", f"--model={model}",
                          f"--precision={precision}", "--max_steps=3",
                          f"--data_dir={MNIST}", f"--log_dir={log_dir}",
                          *TINY)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn("summary: outer_steps=3", result.stdout)
    self.assertEqual(os.listdir(log_dir),
                     [f"mnist_{model}_nesterov_seed0_{precision}"])

  def test_presets_follow_the_reference(self):
    result = run_launcher("mnist", "--helpfull")
    for text in ("lenet/entropy_sgd: 5", "mnistfc/sgd: 100",
                 "--model=lenet --opt=entropy_sgd: epochs=5, lr=1.0, "
                 "lr_decay_epochs=(2, 7), lr_decay_factor=0.1",
                 "gamma=0.0001",
                 "--recipe=paper --model=lenet --opt=adam:",
                 "--noise=0.001  (Sec. 5.1"):
      self.assertIn(text, result.stdout)

  def test_steps_per_loop_changes_nothing_but_speed(self):
    log_dir = self.create_tempdir().full_path
    # Decays inside epochs (after steps 6 and 15) must end loops too.
    common = ["--opt=entropy_sgd", "--model=mnistfc", "--L=2", "--epochs=2",
              "--lr_decay_epochs=0.55,1.5",
              "--deterministic", f"--data_dir={MNIST}", f"--log_dir={log_dir}",
              "--batch_size=20", "--log_every_steps=10"]
    for name, loop in (("one", "1"), ("seven", "7")):
      result = run_in_process("mnist", *common, f"--steps_per_loop={loop}",
                            f"--run_name={name}")
      self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    one = checkpoints.checkpoint_model_variables(os.path.join(log_dir, "one"))
    seven = checkpoints.checkpoint_model_variables(
        os.path.join(log_dir, "seven"))
    for name in one:
      np.testing.assert_allclose(seven[name], one[name], rtol=1e-6,
                                 atol=1e-7, err_msg=name)
    # Loop boundaries fall on epochs: both evaluated at steps 10 and 20.
    self.assertCountEqual(
        os.listdir(os.path.join(log_dir, "seven", "checkpoints")),
        os.listdir(os.path.join(log_dir, "one", "checkpoints")))

  def test_seeds_run_one_after_another_and_skip_finished_runs(self):
    log_dir = self.create_tempdir().full_path
    args = ["--opt=sgd", "--model=mnistfc", "--epochs=1", f"--data_dir={MNIST}",
            f"--log_dir={log_dir}", *TINY]
    first = run_in_process("mnist", *args, "--seeds=0,1")
    self.assertEqual(first.returncode, 0, first.stderr[-3000:])
    self.assertEqual(first.stdout.count("summary: outer_steps=10"), 2)
    self.assertCountEqual(os.listdir(log_dir), [
        "mnist_mnistfc_sgd_seed0", "mnist_mnistfc_sgd_seed1"])
    again = run_in_process("mnist", *args, "--seeds=0,1,2")
    self.assertEqual(again.returncode, 0, again.stderr[-3000:])
    self.assertEqual(again.stderr.count("already finished"), 2)
    self.assertLen(os.listdir(log_dir), 3)
    for seed in range(3):
      self.assertTrue(os.path.exists(os.path.join(
          log_dir, f"mnist_mnistfc_sgd_seed{seed}", "summary.json")))

  def test_noise_kernel_choice_is_kept_on_resume(self):
    log_dir = self.create_tempdir().full_path
    args = ["--opt=entropy_sgd", "--model=mnistfc", "--L=2",
            f"--data_dir={MNIST}", f"--log_dir={log_dir}", "--run_name=run",
            *TINY]
    first = run_in_process("mnist", *args, "--noise_kernel=off",
                         "--max_steps=2")
    self.assertEqual(first.returncode, 0, first.stderr[-3000:])
    path = os.path.join(log_dir, "run", "config.json")
    with open(path) as f:
      config = json.load(f)
    self.assertEqual(config["noise_implementation"], "tensorflow")
    # As if the first start had drawn with the kernel on another machine.
    config["noise_implementation"] = "kernel"
    with open(path, "w") as f:
      json.dump(config, f)
    refused = run_in_process("mnist", *args, "--noise_kernel=off",
                           "--max_steps=4")
    self.assertEqual(refused.returncode, 1)
    self.assertNotIn("Traceback", refused.stderr)
    errors = error_lines(refused)
    self.assertLen(errors, 1, refused.stderr[-2000:])
    self.assertIn("drew its Langevin noise with the compiled kernel, but "
                  "here it would use TensorFlow's ops", errors[0])
    self.assertIn("--noise_kernel=on, on a machine where the kernel loads",
                  errors[0])
    self.assertIn("--allow_config_change", errors[0])
    accepted = run_in_process("mnist", *args, "--noise_kernel=off",
                            "--max_steps=4", "--allow_config_change")
    self.assertEqual(accepted.returncode, 0, accepted.stderr[-3000:])
    self.assertIn("summary: outer_steps=4", accepted.stdout)

  def test_noise_kernel_on_without_a_kernel_is_one_line(self):
    log_dir = self.create_tempdir().full_path
    missing = os.path.join(log_dir, "missing.so")
    result = run_in_process("mnist", "--opt=entropy_sgd",
                            "--noise_kernel=on", f"--data_dir={MNIST}",
                            f"--log_dir={log_dir}",
                            env={"ENTROPY_SGD_NOISE_KERNEL": missing})
    self.assertEqual(result.returncode, 1)
    self.assertEqual(error_lines(result), [
        f"error: --noise_kernel=on, but the compiled noise kernel is "
        f"missing: ENTROPY_SGD_NOISE_KERNEL={missing} does not exist; unset "
        f"ENTROPY_SGD_NOISE_KERNEL or point it at a built library; or pass "
        f"--noise_kernel=off (TensorFlow's ops: the same distribution, "
        f"slower on CPUs)."])
    self.assertEmpty(os.listdir(log_dir))

  def corrupt(self, name, mutate):
    data_dir = copy_mnist(os.path.join(self.create_tempdir().full_path, "m"))
    path = os.path.join(data_dir, name)
    with open(path, "rb") as f:
      content = bytearray(f.read())
    with open(path, "wb") as f:
      f.write(mutate(content))
    return data_dir

  @parameterized.named_parameters(
      ("wrong_magic", "train-images-idx3-ubyte",
       lambda c: struct.pack(">I", 2049) + c[4:], "magic number 2049"),
      ("wrong_count", "t10k-labels-idx1-ubyte",
       lambda c: c[:4] + struct.pack(">I", 49) + c[8:-1],
       "holds 49 labels but its images file holds 50"),
      ("truncated", "train-images-idx3-ubyte", lambda c: c[:-100],
       "header promises"),
      ("label_above_9", "train-labels-idx1-ubyte",
       lambda c: c[:20] + bytes([10]) + c[21:], "label 10 of example 12"),
  )
  def test_bad_data_is_one_line_naming_the_file(self, name, mutate, message):
    data_dir = self.corrupt(name, mutate)
    result = run_in_process("mnist", f"--data_dir={data_dir}",
                            f"--log_dir={self.create_tempdir().full_path}")
    self.assertEqual(result.returncode, 1)
    errors = error_lines(result)
    self.assertLen(errors, 1, result.stderr[-2000:])
    self.assertIn(os.path.join(data_dir, name), errors[0])
    self.assertIn(message, errors[0])

  def test_corrupt_gzip_names_the_file(self):
    data_dir = os.path.join(self.create_tempdir().full_path, "m")
    shutil.copytree(os.path.join(TESTDATA, "mnist_gz"), data_dir)
    path = os.path.join(data_dir, "t10k-images-idx3-ubyte.gz")
    with open(path, "rb") as f:
      content = gzip.decompress(f.read())
    with open(path, "wb") as f:
      f.write(gzip.compress(content)[:-30])
    # From the binary: a data error's one line and exit code, as a shell
    # sees them (the other bad data run in process, above).
    result = run_launcher("mnist", f"--data_dir={data_dir}",
                          f"--log_dir={self.create_tempdir().full_path}")
    self.assertEqual(result.returncode, 1)
    self.assertNotIn("Traceback", result.stderr)
    self.assertLen(error_lines(result), 1, result.stderr[-2000:])
    self.assertIn(path, error_lines(result)[0])

  @parameterized.named_parameters(
      ("missing_files", ["--data_dir=/nonexistent/mnist"], "--data_dir"),
      ("cifar_model", ["--model=wrn-16-1"],
       "--model=wrn-16-1 is built for cifar10/cifar100, not mnist; choose "
       "one of mnistfc, lenet"),
      # Other settings config.validate refuses are checked in process
      # (config_test's ValidationTest).
      ("bad_seeds", ["--seeds=0,x"], "--seeds must be integers"),
  )
  def test_bad_flags_are_one_line(self, args, message):
    log_dir = self.create_tempdir().full_path
    data_args = ([] if any(a.startswith("--data_dir") for a in args)
                 else [f"--data_dir={MNIST}"])
    result = run_in_process("mnist", f"--log_dir={log_dir}", *data_args,
                            *args)
    self.assertEqual(result.returncode, 1)
    errors = error_lines(result)
    self.assertLen(errors, 1, result.stderr[-2000:])
    self.assertIn(message, errors[0])
    if message != "--data_dir":
      self.assertEmpty(os.listdir(log_dir))


if __name__ == "__main__":
  absltest.main()
