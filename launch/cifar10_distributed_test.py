"""The CIFAR-10 launcher on several devices and several worker processes.

Each run is a tiny Entropy-SGD run (WRN-10-1, L = 2, 2 outer steps, then
BatchNorm recalibration, evaluation and a checkpoint) with synchronised
BatchNorm and op determinism, on testdata/.

One device and 2 replicas run the launcher in process, on 2 logical CPUs
configured before TensorFlow starts (`setUpModule`). 4 replicas run in a
subprocess: a second MirroredStrategy of another size in one process reuses
the first's collective group keys, and TensorFlow refuses the synchronised
BatchNorm's all-reduce ("joining a group with size4, but that group has
size 2"). MultiWorkerMirroredStrategy needs one process per worker. BUILD
sets TF_ENABLE_ONEDNN_OPTS=1, as the launchers do, so all compute alike.
"""

import json
import os
import re
import socket
import subprocess

from absl.testing import absltest
import numpy as np

from entropy_sgd.core import distribution
from entropy_sgd.train import checkpoints
from launch.launcher_testing import launcher_command
from launch.launcher_testing import launcher_env
from launch.launcher_testing import run_in_process
from launch.launcher_testing import run_launcher
from launch.launcher_testing import TESTDATA

TINY_ENTROPY_SGD = [
    "--opt=entropy_sgd", "--L=2", "--max_steps=2", "--model=wrn-10-1",
    "--batch_size=20", "--lr=0.5", "--langevin_lr=0.05",
    "--recalibration_batches=1", "--log_every_steps=1", "--sync_batch_norm",
    "--deterministic", f"--data_dir={os.path.join(TESTDATA, 'cifar10')}"]
CHECKSUM = re.compile(r"final weights checksum: (\S+)")


def free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("localhost", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def setUpModule():
  distribution.logical_cpus(2)


class MirroredTest(absltest.TestCase):

  def test_2_and_4_replicas_follow_one_device(self):
    log_dir = self.create_tempdir().full_path
    runs = {"default": ["--strategy=default"],
            "mirrored2": ["--strategy=mirrored", "--num_devices=2"],
            "mirrored4": ["--strategy=mirrored", "--num_devices=4"]}
    checksums = {}
    for name, args in runs.items():  # One at a time: 2 cores.
      run = run_launcher if name == "mirrored4" else run_in_process
      result = run("cifar10", *TINY_ENTROPY_SGD, *args,
                   f"--log_dir={log_dir}", f"--run_name={name}")
      self.assertEqual(result.returncode, 0, result.stderr[-3000:])
      self.assertIn("summary: outer_steps=2", result.stdout)
      checksums[name] = float(CHECKSUM.search(result.stderr).group(1))
    self.assertIn("4 replica(s)", result.stderr)
    expected = checkpoints.checkpoint_model_variables(os.path.join(log_dir, "default"))
    for name in ("mirrored2", "mirrored4"):
      actual = checkpoints.checkpoint_model_variables(os.path.join(log_dir, name))
      self.assertSameElements(actual, expected)
      for variable in expected:
        # One device keeps the fused BatchNorm kernel, whose moving variance
        # takes the unbiased batch variance: n/(n-1) <= 1 + 8e-4 here (the
        # final BatchNorm sees 20 x 8 x 8 values per channel).
        rtol = 2e-3 if "moving_variance" in variable else 1e-4
        np.testing.assert_allclose(actual[variable], expected[variable],
                                   rtol=rtol, atol=1e-6,
                                   err_msg=f"{name}: {variable}")
      self.assertAlmostEqual(checksums[name], checksums["default"],
                             delta=1e-4 * checksums["default"])  # Moving variances differ by n/(n-1).


class MultiWorkerTest(absltest.TestCase):

  def run_workers(self, log_dirs, temp_dirs, *args):
    """Runs 2 workers on localhost; returns their (stdout, stderr)."""
    cluster = {"worker": [f"localhost:{port}" for port in free_ports(2)]}
    self.workers = []
    try:
      for index, (log_dir, temp_dir) in enumerate(zip(log_dirs, temp_dirs)):
        tf_config = json.dumps({"cluster": cluster,
                                "task": {"type": "worker", "index": index}})
        self.workers.append(subprocess.Popen(
            launcher_command("cifar10") + TINY_ENTROPY_SGD + [
                "--strategy=multi_worker", f"--log_dir={log_dir}",
                "--run_name=run", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=launcher_env(TF_CONFIG=tf_config, TMPDIR=temp_dir)))
      return [worker.communicate(timeout=900) for worker in self.workers]
    finally:
      for worker in self.workers:
        if worker.poll() is None:
          worker.kill()
          worker.wait()

  def test_two_workers_train_in_lockstep_and_only_the_chief_writes(self):
    log_dir = self.create_tempdir().full_path  # Shared by both workers.
    temp_dirs = [self.create_tempdir().full_path for _ in range(2)]
    outputs = self.run_workers([log_dir, log_dir], temp_dirs)
    workers = self.workers
    for worker, (stdout, stderr) in zip(workers, outputs):
      self.assertEqual(worker.returncode, 0, stderr[-3000:])
      self.assertIn("summary: outer_steps=2", stdout)
      self.assertIn("CollectiveAllReduceStrategy, 2 replica(s)", stderr)
    # Same weights on both workers.
    checksums = [CHECKSUM.search(stderr).group(1) for _, stderr in outputs]
    self.assertEqual(checksums[0], checksums[1])
    # Only the chief (worker 0) wrote: its events file and checkpoints.
    run_dir = os.path.join(log_dir, "run")
    self.assertEqual(os.listdir(log_dir), ["run"])
    events = [f for f in os.listdir(run_dir) if f.startswith("events.out")]
    self.assertLen(events, 1)
    self.assertEqual(events[0].split(".")[-3], str(workers[0].pid))
    self.assertEqual(set(os.listdir(run_dir)),
                     {events[0], "checkpoints", "config.json", ".lock"})
    # Only the chief locked the run directory.
    with open(os.path.join(run_dir, ".lock")) as f:
      self.assertEqual(f.read().split()[:2], ["pid", str(workers[0].pid)])
    self.assertIn("ckpt-2.index",
                  os.listdir(os.path.join(run_dir, "checkpoints")))
    saved = sum(np.abs(value).sum(dtype=np.float64)
                for value in checkpoints.checkpoint_model_variables(run_dir).values())
    self.assertAlmostEqual(float(checksums[0]), saved, delta=1e-9 * saved)
    # The other worker's temporary checkpoints are gone.
    for temp_dir in temp_dirs:
      self.assertEmpty([f for f in os.listdir(temp_dir)
                        if f.startswith("entropy_sgd_")])

    # Resuming needs the chief's checkpoints on every worker: a worker with
    # its own (empty) --log_dir is caught before training, on both workers.
    outputs = self.run_workers(
        [log_dir, self.create_tempdir().full_path], temp_dirs,
        "--max_steps=3")
    for worker, (_, stderr) in zip(self.workers, outputs):
      self.assertEqual(worker.returncode, 1, stderr[-3000:])
      self.assertRegex(stderr.splitlines()[-1],
                       "^error: .*resumed from different outer steps")


if __name__ == "__main__":
  absltest.main()
