"""The run log's advice for CPU runs."""

import tensorflow as tf

from entropy_sgd.train import config as config_lib
from entropy_sgd.train import run_log


class CpuHintTest(tf.test.TestCase):

  def test_cpu_hint_only_for_runs_over_a_day(self):
    config = config_lib.from_preset("entropy_sgd")  # WRN-28-10.
    with self.assertLogs(level="WARNING") as logs:
      run_log.hint_if_cpu_run_is_long(config, 2 * 86400)
    self.assertLen(logs.output, 1)
    self.assertRegex(logs.output[0], r"No GPU or TPU found and this run would "
                     r"take 48:00:00.*--model=wrn-16-1 --epochs=1")
    with self.assertNoLogs(level="WARNING"):
      run_log.hint_if_cpu_run_is_long(config, 3600)


if __name__ == "__main__":
  tf.test.main()
