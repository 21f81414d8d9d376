"""oneDNN: the launchers' decision and the library users' advice."""

import sys
from unittest import mock

from absl.testing import absltest

from entropy_sgd.core import onednn


class OneDnnTest(absltest.TestCase):

  def test_launchers_turn_it_on_unless_the_user_chose(self):
    environ = {}
    with mock.patch.dict(sys.modules):
      sys.modules.pop("tensorflow", None)
      message = onednn.enable_before_tensorflow(environ)
    self.assertEqual(environ, {onednn.ENV: "1"})
    self.assertIn("turned on", message)
    self.assertEqual(onednn.launcher_message(), message)
    mine = {onednn.ENV: "0"}
    self.assertIn("set by you", onednn.enable_before_tensorflow(mine))
    self.assertEqual(mine, {onednn.ENV: "0"})

  def test_too_late_once_tensorflow_is_imported(self):
    environ = {}
    with mock.patch.dict(sys.modules, {"tensorflow": object()}):
      self.assertIn("imported before", onednn.enable_before_tensorflow(
          environ))
    self.assertEqual(environ, {})

  def test_tensorflows_rule(self):
    epyc_avx2 = {"avx", "avx2", "fma"}
    sapphire = {"avx2", "avx512f", "amx_tile"}
    self.assertFalse(onednn.is_on({}, epyc_avx2))
    self.assertTrue(onednn.is_on({}, sapphire))
    self.assertTrue(onednn.is_on({onednn.ENV: "1"}, epyc_avx2))
    self.assertFalse(onednn.is_on({onednn.ENV: "false"}, sapphire))

  def test_advice_once_and_only_when_off(self):
    logged = []
    with mock.patch.object(onednn, "_advised", False):
      self.assertIsNone(onednn.advise_if_off(logged.append, {},
                                             {"avx512_vnni"}))
      self.assertIn(f"set {onednn.ENV}=1", onednn.advise_if_off(
          logged.append, {}, {"avx2"}))
      self.assertIsNone(onednn.advise_if_off(logged.append, {}, {"avx2"}))
    self.assertLen(logged, 1)

  def test_reads_cpu_flags(self):
    path = self.create_tempfile(content="processor: 0\nflags\t\t: fpu avx2 "
                                "avx512_vnni\n").full_path
    self.assertEqual(onednn.cpu_flags(path), {"fpu", "avx2", "avx512_vnni"})
    self.assertEqual(onednn.cpu_flags("/nonexistent"), set())


if __name__ == "__main__":
  absltest.main()
