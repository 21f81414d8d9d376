"""The run-directory format and guards, in process (the launcher-level cases
are in launch/run_dir_faults_test.py)."""

import errno
import json
import math
import os
import subprocess
import sys
from unittest import mock

from absl.testing import absltest
import numpy as np
import tensorflow as tf

from entropy_sgd.train import run_dir


def save_checkpoints(directory, steps, value=1.0):
  variable = tf.Variable(np.full([1000], value, np.float32))
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=variable),
                                       directory, max_to_keep=10)
  for step in steps:
    variable.assign_add(tf.ones_like(variable))
    manager.save(checkpoint_number=step)
  return variable


class StrictJsonTest(absltest.TestCase):

  def test_non_finite_floats_round_trip_as_strings(self):
    path = os.path.join(self.create_tempdir().full_path, "c.json")
    run_dir.write_json(path, {"rho": math.inf, "x": [-math.inf, 1.5],
                              "n": math.nan, "k": 3})
    with open(path) as f:
      text = f.read()
    values = json.loads(text, parse_constant=self.fail)
    self.assertEqual(values, {"rho": "inf", "x": ["-inf", 1.5], "n": "nan",
                              "k": 3})
    decoded = run_dir.decode_config(values, ["rho", "n"])
    self.assertEqual(decoded["rho"], math.inf)
    self.assertTrue(math.isnan(decoded["n"]))
    self.assertEqual(decoded["x"], ["-inf", 1.5])  # Not a float field.

  def test_a_failed_write_leaves_the_old_file_and_names_the_errno(self):
    path = os.path.join(self.create_tempdir().full_path, "c.json")
    run_dir.write_json(path, {"a": 1})
    with mock.patch.object(run_dir.os, "fsync",
                           side_effect=OSError(errno.ENOSPC,
                                               os.strerror(errno.ENOSPC))):
      with self.assertRaisesRegex(run_dir.RunDirError,
                                  r"cannot write .*c.json: No space left on "
                                  r"device \(ENOSPC\); free some space"):
        run_dir.write_json(path, {"a": 2})
    self.assertEqual(run_dir.read_json(path), {"a": 1})
    self.assertFalse(os.path.exists(path + ".tmp"))

  def test_tensorflow_write_errors_are_mapped_to_their_errno(self):
    error = tf.errors.ResourceExhaustedError(
        None, None, "/x/ckpt-30_temp/part-00000; No space left on device")
    message = str(run_dir.checkpoint_write_error("/x", 30, error))
    self.assertIn("cannot write /x/ckpt-30", message)
    self.assertIn("(ENOSPC)", message)
    other = str(run_dir.checkpoint_write_error(
        "/x", 30, tf.errors.UnknownError(None, None, "flaky NFS")))
    self.assertIn("flaky NFS", other)


class CheckpointTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.directory = self.create_tempdir().full_path

  def test_newest_intact_without_damage_touches_nothing(self):
    save_checkpoints(self.directory, [10, 20, 30])
    before = sorted(os.listdir(self.directory))
    self.assertEqual(run_dir.newest_intact_checkpoint(self.directory),
                     os.path.join(self.directory, "ckpt-30"))
    self.assertEqual(sorted(os.listdir(self.directory)), before)
    self.assertIsNone(run_dir.newest_intact_checkpoint(
        os.path.join(self.directory, "none")))

  def test_truncated_newest_is_moved_aside_and_state_rewritten(self):
    save_checkpoints(self.directory, [10, 20, 30])
    data = os.path.join(self.directory, "ckpt-30.data-00000-of-00001")
    with open(data, "r+b") as f:
      f.truncate(10)
    self.assertIn("does not read back", run_dir.check_checkpoint(
        os.path.join(self.directory, "ckpt-30")))
    # Without repair (workers, tools) nothing moves.
    self.assertEqual(run_dir.newest_intact_checkpoint(self.directory,
                                                      repair=False),
                     os.path.join(self.directory, "ckpt-20"))
    self.assertTrue(os.path.exists(data))
    with self.assertLogs(level="WARNING") as logs:
      newest = run_dir.newest_intact_checkpoint(self.directory)
    self.assertEqual(newest, os.path.join(self.directory, "ckpt-20"))
    self.assertLen(logs.output, 1)
    self.assertTrue(os.path.exists(data + ".damaged"))
    self.assertEqual(tf.train.latest_checkpoint(self.directory), newest)
    state = tf.train.get_checkpoint_state(self.directory)
    self.assertEqual([os.path.basename(p)
                      for p in state.all_model_checkpoint_paths],
                     ["ckpt-10", "ckpt-20"])
    # A manager built now rotates the survivors as its own.
    variable = tf.Variable(np.zeros([1000], np.float32))
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=variable),
                                         self.directory, max_to_keep=2)
    manager.save(checkpoint_number=30)
    indexes = sorted(n for n in os.listdir(self.directory)
                     if n.endswith(".index"))
    self.assertEqual(indexes, ["ckpt-20.index", "ckpt-30.index"])
    # A second damage of ckpt-30 does not overwrite the first one moved aside.
    with open(data, "r+b") as f:
      f.truncate(10)
    run_dir.newest_intact_checkpoint(self.directory)
    self.assertTrue(os.path.exists(data + ".damaged-2"))

  def test_non_finite_checkpoint_is_not_resumed_from(self):
    save_checkpoints(self.directory, [10])
    bad = tf.Variable(np.full([1000], np.nan, np.float32))
    tf.train.CheckpointManager(tf.train.Checkpoint(v=bad), self.directory,
                               max_to_keep=10).save(checkpoint_number=20)
    self.assertIn("NaN or Inf", run_dir.check_checkpoint(
        os.path.join(self.directory, "ckpt-20")))
    self.assertEqual(run_dir.newest_intact_checkpoint(self.directory),
                     os.path.join(self.directory, "ckpt-10"))

  def test_none_intact_raises_and_renames_nothing(self):
    save_checkpoints(self.directory, [10, 20])
    for step in (10, 20):
      os.remove(os.path.join(self.directory, f"ckpt-{step}.index"))
    before = sorted(os.listdir(self.directory))
    with self.assertRaisesRegex(
        run_dir.RunDirError, r"no checkpoint in .* ckpt-20 \(its index file "
        r"is missing\), ckpt-10 .*Nothing was changed"):
      run_dir.newest_intact_checkpoint(self.directory)
    self.assertEqual(sorted(os.listdir(self.directory)), before)


class ResolveUserPathTest(absltest.TestCase):

  def test_relative_paths_resolve_against_the_bazel_working_directory(self):
    os.environ["BUILD_WORKING_DIRECTORY"] = "/some/where"
    try:
      self.assertEqual(run_dir.resolve_user_path("runs/x"),
                       "/some/where/runs/x")
      self.assertEqual(run_dir.resolve_user_path("/abs"), "/abs")
      self.assertIsNone(run_dir.resolve_user_path(None))
    finally:
      del os.environ["BUILD_WORKING_DIRECTORY"]


class LockTest(absltest.TestCase):

  def test_a_second_holder_is_refused_with_the_first_ones_pid(self):
    directory = self.create_tempdir().full_path
    lock = run_dir.RunLock(directory)
    code = (f"import sys; sys.path.insert(0, {os.getcwd()!r}); "
            f"from entropy_sgd.train import run_dir\n"
            f"try:\n  run_dir.RunLock({directory!r})\n"
            f"except run_dir.RunDirError as e:\n  print(e); sys.exit(7)")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True,
                           text=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                               sys.path)))
    self.assertEqual(other.returncode, 7, other.stderr)
    self.assertIn(f"pid {os.getpid()} on", other.stdout)
    lock.release()
    again = run_dir.RunLock(directory)  # Free once released.
    again.release()


class ConfigChangesTest(absltest.TestCase):

  def test_allowed_and_refused(self):
    old = {"lr": 0.1, "epochs": 5, "lr_decay_epochs": [2, 7], "rho": math.inf,
           "seed": 0}
    new = {"lr": 0.05, "epochs": 10, "lr_decay_epochs": (2, 7),
           "rho": math.inf, "seed": 0, "new_field": 1}
    allowed, refused = run_dir.config_changes(old, new, {"epochs"})
    self.assertEqual(allowed, {"epochs": (5, 10)})
    self.assertEqual(refused, {"lr": (0.1, 0.05)})
    self.assertEqual(run_dir.format_changes({**allowed, **refused}),
                     "--epochs 5 -> 10, --lr 0.1 -> 0.05")


if __name__ == "__main__":
  absltest.main()
