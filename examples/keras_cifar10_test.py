"""Smoke run of the Keras CIFAR-10 example on the tiny testdata files."""

import os
import subprocess
import sys

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class KerasCifar10Test(absltest.TestCase):

  def test_two_steps_on_testdata(self):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2",
               BUILD_WORKING_DIRECTORY=ROOT)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "keras_cifar10.py"),
         "--data_dir=testdata/cifar10", "--batch_size=16", "--L=2",
         "--epochs=1", "--max_steps=2"],
        env=env, capture_output=True, text=True, timeout=600, check=False)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    output = result.stdout + result.stderr
    for key in ("gamma", "anchor_to_mean_distance", "val_accuracy"):
      self.assertIn(key, output)


if __name__ == "__main__":
  absltest.main()
