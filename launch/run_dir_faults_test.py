"""The run directory protects itself, through the real launcher.

Each case as a user meets it: a damaged newest checkpoint, the same command
started twice, a resume with a changed hyperparameter, and a full disk.
Every fault ends in one `error:` line or one warning, never a traceback, and
every good checkpoint survives. The launcher runs in process
(`run_in_process`), except the first of two processes, which must be one;
BUILD sets TF_ENABLE_ONEDNN_OPTS=1 as the launchers do, so both give the
same weights.
"""

import json
import os
import subprocess
import time

from absl.testing import absltest
from absl.testing import parameterized

# Imported up front: the second of two processes, run in process, then meets
# the first's lock at once instead of after TensorFlow's import.
from entropy_sgd.cli import launcher  # pylint: disable=unused-import
from entropy_sgd.train import run_dir as run_dir_lib
from launch.launcher_testing import error_lines
from launch.launcher_testing import launcher_command
from launch.launcher_testing import launcher_env
from launch.launcher_testing import run_in_process
from launch.launcher_testing import TESTDATA

MNIST = os.path.join(TESTDATA, "mnist")
# 200 images in batches of 20: an epoch is 10 outer steps and ends in a
# checkpoint (ckpt-10, ckpt-20, ckpt-30).
COMMON = ["--opt=nesterov", "--model=lenet", f"--data_dir={MNIST}",
          "--batch_size=20", "--log_every_steps=5",
          "--recalibration_batches=1", "--deterministic"]


def checksum_line(result):
  lines = [l for l in result.stderr.splitlines()
           if "final weights checksum" in l]
  return lines[-1].split("checksum:")[-1].strip() if lines else None


class RunDirFaultsTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.log_dir = self.create_tempdir().full_path

  def train(self, *args, run_name="run", epochs=3):
    return run_in_process("mnist", *COMMON, f"--log_dir={self.log_dir}",
                          f"--run_name={run_name}", f"--epochs={epochs}",
                          *args)

  _reference_checksums = {}  # epochs -> checksum, shared by the tests.

  def reference_checksum(self, epochs=3):
    """The final weights checksum of an undisturbed run of `epochs`."""
    if epochs not in self._reference_checksums:
      log_dir = self.create_tempdir().full_path
      result = run_in_process("mnist", *COMMON, f"--log_dir={log_dir}",
                              "--run_name=undisturbed", f"--epochs={epochs}")
      self.assertEqual(result.returncode, 0, result.stderr[-3000:])
      self._reference_checksums[epochs] = checksum_line(result)
    return self._reference_checksums[epochs]

  def checkpoints(self, run_name="run"):
    return sorted(os.listdir(os.path.join(self.log_dir, run_name,
                                          "checkpoints")))

  @parameterized.named_parameters(
      ("truncated_data_file", "ckpt-30.data-00000-of-00001", "truncate"),
      ("truncated_index", "ckpt-30.index", "truncate"),
      ("missing_data_file", "ckpt-30.data-00000-of-00001", "delete"),
      ("damaged_state_file", "checkpoint", "garble"))
  def test_damaged_newest_checkpoint_falls_back(self, victim, how):
    first = self.train(epochs=3)
    self.assertEqual(first.returncode, 0, first.stderr[-3000:])
    path = os.path.join(self.log_dir, "run", "checkpoints", victim)
    if how == "truncate":
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
    elif how == "delete":
      os.remove(path)
    else:
      with open(path, "wb") as f:
        f.write(b"\x00\xffmodel_checkpoint_path: {{{\n")
    resumed = self.train(epochs=5)
    self.assertEqual(resumed.returncode, 0, resumed.stderr[-3000:])
    self.assertNotIn("Traceback", resumed.stderr)
    warnings = [line for line in resumed.stderr.splitlines()
                if " is damaged (" in line]
    self.assertLen(warnings, 1, resumed.stderr[-3000:])
    if victim == "checkpoint":  # All checkpoints intact: the newest wins.
      self.assertIn("Resuming from", resumed.stderr)
      self.assertIn("ckpt-30 (outer step 30)", resumed.stderr)
      self.assertIn("checkpoint.damaged", self.checkpoints())
    else:
      self.assertIn("ckpt-30 is damaged", warnings[0])
      self.assertIn("resuming from ckpt-20", warnings[0])
      self.assertIn("ckpt-20 (outer step 20)", resumed.stderr)
    # It ends exactly as an uninterrupted run, and rotation counts only the
    # intact checkpoints (3 kept).
    self.assertEqual(checksum_line(resumed), self.reference_checksum(5))
    intact = [n for n in self.checkpoints() if n.endswith(".index")]
    self.assertEqual(intact, ["ckpt-30.index", "ckpt-40.index",
                              "ckpt-50.index"])

  def test_no_intact_checkpoint_is_one_line_and_deletes_nothing(self):
    first = self.train(epochs=2)
    self.assertEqual(first.returncode, 0, first.stderr[-3000:])
    for number in (10, 20):
      path = os.path.join(self.log_dir, "run", "checkpoints",
                          f"ckpt-{number}.data-00000-of-00001")
      with open(path, "r+b") as f:
        f.truncate(100)
    before = self.checkpoints()
    resumed = self.train(epochs=3)
    self.assertEqual(resumed.returncode, 1)
    (line,) = error_lines(resumed)
    self.assertIn("no checkpoint in", line)
    self.assertIn("ckpt-20 (it does not read back", line)
    self.assertIn("ckpt-10", line)
    self.assertIn("Nothing was changed", line)
    self.assertEqual(self.checkpoints(), before)

  def test_second_process_is_refused_and_the_first_is_undisturbed(self):
    command = launcher_command("mnist") + COMMON + [
        f"--log_dir={self.log_dir}", "--run_name=run", "--epochs=10"]
    first = subprocess.Popen(command, env=launcher_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
      lock = os.path.join(self.log_dir, "run", ".lock")
      deadline = time.time() + 300
      while time.time() < deadline and not (
          os.path.exists(lock) and os.path.getsize(lock)):
        time.sleep(0.2)
      second = self.train(epochs=10)
      self.assertEqual(second.returncode, 1)
      (line,) = error_lines(second)
      self.assertIn(f"pid {first.pid} on", line)
      self.assertIn("is in use", line)
      stdout, stderr = first.communicate(timeout=600)
    finally:
      if first.poll() is None:
        first.kill()
    self.assertEqual(first.returncode, 0, stderr[-3000:])
    self.assertEqual(checksum_line(subprocess.CompletedProcess(
        command, 0, stdout, stderr)), self.reference_checksum(10))
    # The lock went with the process: the same command runs again (and
    # finds the run finished).
    again = self.train(epochs=10)
    self.assertEqual(again.returncode, 0, again.stderr[-3000:])

  def test_changed_setting_is_refused_then_overridden_and_recorded(self):
    first = self.train(epochs=1)
    self.assertEqual(first.returncode, 0, first.stderr[-3000:])
    refused = self.train("--lr=0.05", "--momentum=0.5", epochs=2)
    self.assertEqual(refused.returncode, 1)
    (line,) = error_lines(refused)
    self.assertIn("--lr 0.1 -> 0.05, --momentum 0.9 -> 0.5", line)
    self.assertIn("--allow_config_change", line)
    self.assertEqual(self.checkpoints(), ["checkpoint", "ckpt-10.data-"
                                          "00000-of-00001", "ckpt-10.index"])
    # Extending the run is allowed, and logged.
    extended = self.train(epochs=2)
    self.assertEqual(extended.returncode, 0, extended.stderr[-3000:])
    self.assertIn("Resuming with --epochs 1 -> 2", extended.stderr)
    overridden = self.train("--lr=0.05", "--allow_config_change", epochs=3)
    self.assertEqual(overridden.returncode, 0, overridden.stderr[-3000:])
    self.assertIn("--lr 0.1 -> 0.05", overridden.stderr)
    with open(os.path.join(self.log_dir, "run", "config.json")) as f:
      config = json.load(f)
    self.assertEqual(config["lr"], 0.05)
    self.assertEqual(config["config_changes"], [
        {"step": 10, "allowed": {"epochs": [1, 2]}, "overridden": {}},
        {"step": 20, "allowed": {"epochs": [2, 3]},
         "overridden": {"lr": [0.1, 0.05]}}])

  def test_config_json_is_strict_json(self):
    result = self.train(epochs=1)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    for name in ("config.json", "summary.json"):
      with open(os.path.join(self.log_dir, "run", name)) as f:
        json.load(f, parse_constant=lambda c: self.fail(f"{name}: {c}"))
    with open(os.path.join(self.log_dir, "run", "config.json")) as f:
      self.assertEqual(json.load(f)["rho"], "inf")

  def test_full_disk_stops_with_one_line_and_resumes_exactly(self):
    mount_point = self.create_tempdir().full_path
    # Two LeNet checkpoints (1.07 MB each) fit, the third does not.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2600k",
                              "tmpfs", mount_point], capture_output=True)
    if mounted.returncode != 0:
      self.skipTest("cannot mount a tmpfs here (not root, or a sandbox); "
                    "run_dir_test injects ENOSPC into the writes instead: "
                    + mounted.stderr.decode().strip())
    try:
      args = COMMON + [f"--log_dir={mount_point}", "--run_name=run",
                       "--epochs=3"]
      full = run_in_process("mnist", *args)
      self.assertEqual(full.returncode, 1)
      self.assertNotIn("Traceback", full.stderr)
      (line,) = error_lines(full)
      self.assertIn("ckpt-30", line)
      self.assertIn("(ENOSPC)", line)
      checkpoints = os.path.join(mount_point, "run", "checkpoints")
      self.assertEqual(run_dir_lib.newest_intact_checkpoint(
          checkpoints, repair=False), os.path.join(checkpoints, "ckpt-20"))
      subprocess.run(["mount", "-o", "remount,size=64m", mount_point],
                     check=True)
      resumed = run_in_process("mnist", *args)
      self.assertEqual(resumed.returncode, 0, resumed.stderr[-3000:])
      self.assertIn("ckpt-20 (outer step 20)", resumed.stderr)
      self.assertEqual(checksum_line(resumed), self.reference_checksum(3))
    finally:
      subprocess.run(["umount", "-l", mount_point], capture_output=True)


if __name__ == "__main__":
  absltest.main()
