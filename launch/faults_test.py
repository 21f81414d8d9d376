"""Faults through the real launcher: divergence saves nothing, SIGTERM loses
nothing.

The launcher runs in process (`run_in_process`), except the run that takes
SIGTERM, which must be a process; BUILD sets TF_ENABLE_ONEDNN_OPTS, so both
compute alike.
"""

import glob
import os
import signal
import subprocess

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from entropy_sgd.train import checkpoints
from launch.launcher_testing import error_lines
from launch.launcher_testing import launcher_command
from launch.launcher_testing import launcher_env
from launch.launcher_testing import run_in_process
from launch.launcher_testing import TESTDATA

MNIST = os.path.join(TESTDATA, "mnist")
EXIT_DIVERGED, EXIT_PREEMPTED = 3, 75


def all_finite(checkpoint_path):
  reader = tf.train.load_checkpoint(checkpoint_path)
  names = reader.get_variable_to_shape_map()
  bad = [n for n in names if np.asarray(reader.get_tensor(n)).dtype.kind == "f"
         and not np.all(np.isfinite(reader.get_tensor(n)))]
  return bad


class DivergenceTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # The scenario: the weights blow up at once, the training loss
      # only a few steps later.
      ("sgd", ["--opt=sgd", "--lr=1e12", "--momentum=0.99"]),
      # The outer step sends the anchor to Inf while the Langevin loss at x'
      # (the training loss) is still finite.
      ("entropy_sgd_outer_step", ["--opt=entropy_sgd", "--L=2",
                                  "--lr=1e30"]),
  )
  def test_nothing_non_finite_is_ever_saved(self, diverging_args):
    log_dir = self.create_tempdir().full_path
    common = ["--model=mnistfc", f"--data_dir={MNIST}", f"--log_dir={log_dir}",
              "--batch_size=20", "--log_every_steps=1", "--eval_every_steps=2",
              "--keep_checkpoints=2", "--run_name=run"]
    opt = diverging_args[0]
    good = run_in_process("mnist", opt, "--L=2", "--max_steps=4", *common)
    self.assertEqual(good.returncode, 0, good.stderr[-3000:])
    checkpoint_dir = os.path.join(log_dir, "run", "checkpoints")
    before = {p: open(p, "rb").read()
              for p in glob.glob(os.path.join(checkpoint_dir, "*"))}

    # Resuming under a new --lr is another experiment: say so.
    result = run_in_process("mnist", *diverging_args, "--max_steps=12",
                            "--allow_config_change", *common)
    self.assertEqual(result.returncode, EXIT_DIVERGED, result.stderr[-3000:])
    self.assertNotIn("Traceback", result.stderr)
    errors = error_lines(result)
    self.assertLen(errors, 1, result.stderr[-2000:])
    self.assertRegex(errors[0], r"diverged at outer step \d+ .*Nothing was "
                     r"saved; the last good checkpoint \(.*ckpt-4\) is "
                     r"intact\. Lower --lr")
    after = {p: open(p, "rb").read()
             for p in glob.glob(os.path.join(checkpoint_dir, "*"))}
    self.assertEqual(before, after)
    latest = tf.train.latest_checkpoint(checkpoint_dir)
    self.assertTrue(latest.endswith("ckpt-4"))
    self.assertEmpty(all_finite(latest))


class PreemptionTest(absltest.TestCase):

  def test_sigterm_mid_run_loses_no_step_and_resumes_exactly(self):
    log_dir = self.create_tempdir().full_path
    args = ["--opt=entropy_sgd", "--model=mnistfc", "--L=2", "--epochs=4",
            "--deterministic", f"--data_dir={MNIST}", f"--log_dir={log_dir}",
            "--batch_size=20", "--log_every_steps=1"]
    whole = run_in_process("mnist", *args, "--run_name=whole")
    self.assertEqual(whole.returncode, 0, whole.stderr[-3000:])

    command = launcher_command("mnist") + args + ["--run_name=cut"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                               stdout=subprocess.DEVNULL, env=launcher_env())
    for line in process.stderr:
      if "step 13/40" in line:  # Mid-epoch 2.
        process.send_signal(signal.SIGTERM)
        break
    stderr = process.stderr.read()
    self.assertEqual(process.wait(timeout=300), EXIT_PREEMPTED, stderr)
    preempted = [l for l in stderr.splitlines() if l.startswith("preempted:")]
    self.assertLen(preempted, 1, stderr[-2000:])
    self.assertRegex(preempted[0], r"stopped by SIGTERM after outer step "
                     r"(\d+) of 40; checkpoint .*ckpt-\1\. Rerun")
    saved_step = int(preempted[0].split("outer step ")[1].split()[0])
    self.assertBetween(saved_step, 13, 39)
    self.assertNotEqual(saved_step % 10, 0)  # Not an epoch checkpoint.

    resumed = run_in_process("mnist", *args, "--run_name=cut")
    self.assertEqual(resumed.returncode, 0, resumed.stderr[-3000:])
    self.assertIn("Resuming from", resumed.stderr)
    expected = checkpoints.checkpoint_model_variables(
        os.path.join(log_dir, "whole"))
    actual = checkpoints.checkpoint_model_variables(os.path.join(log_dir, "cut"))
    for name in expected:
      np.testing.assert_array_equal(actual[name], expected[name], name)


if __name__ == "__main__":
  absltest.main()
