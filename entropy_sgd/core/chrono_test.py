"""Tests of entropy_sgd.core.chrono with a fake clock."""

import math

from absl.testing import absltest

from entropy_sgd.core import chrono


class FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


class FormatDurationTest(absltest.TestCase):

  def test_hours_minutes_seconds(self):
    self.assertEqual(chrono.format_duration(3 * 3600 + 5 * 60 + 7.4),
                     "3:05:07")
    self.assertEqual(chrono.format_duration(59.6), "0:01:00")
    self.assertEqual(chrono.format_duration(30 * 3600), "30:00:00")
    self.assertEqual(chrono.format_duration(-2.0), "0:00:00")

  def test_not_finite(self):
    self.assertEqual(chrono.format_duration(math.nan), "n/a")
    self.assertEqual(chrono.format_duration(math.inf), "n/a")
    self.assertEqual(chrono.format_duration(None), "n/a")


class EtaTest(absltest.TestCase):

  def test_rate_counts_only_units_after_start(self):
    clock = FakeClock()
    eta = chrono.Eta(total=100, clock=clock)
    self.assertTrue(math.isnan(eta.remaining(0)))
    clock.now += 50.0  # Warm-up (tracing): not timed.
    eta.start(done=10)  # e.g. a resumed run at step 10.
    self.assertTrue(math.isnan(eta.remaining(10)))
    self.assertEqual(eta.remaining(10, fallback_seconds_per_unit=2.0), 180.0)
    clock.now += 20.0
    self.assertAlmostEqual(eta.seconds_per_unit(20), 2.0)
    self.assertAlmostEqual(eta.remaining(20), 160.0)
    self.assertAlmostEqual(eta.elapsed(), 20.0)

  def test_nothing_left_past_the_total(self):
    clock = FakeClock()
    eta = chrono.Eta(total=5, clock=clock)
    eta.start(0)
    clock.now += 7.0
    self.assertEqual(eta.remaining(7), 0.0)


if __name__ == "__main__":
  absltest.main()
