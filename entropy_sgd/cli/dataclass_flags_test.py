"""Flags from dataclass fields, and their values back."""

import dataclasses
from typing import Optional, Tuple

from absl import flags
from absl.testing import absltest

from entropy_sgd.cli import dataclass_flags
from entropy_sgd.train import config as config_lib


def _field(default, help_text, **metadata):
  return dataclasses.field(default=default, metadata={
      config_lib.HELP: help_text, **metadata})


@dataclasses.dataclass(frozen=True)
class Example:
  path: str = _field(dataclasses.MISSING, "Where; required.")
  steps: int = _field(10, "How many steps.")
  limit: Optional[int] = _field(None, "A limit; unset: none.")
  rate: float = _field(0.5, "A rate.")
  switch: Optional[bool] = _field(None, "Tri-state: unset, true or false.")
  scales: Tuple[float, ...] = _field((1.0, 2.0), "Numbers.")
  names: Tuple[str, ...] = _field(("a", "b"), "Names.")
  other_dir: Optional[str] = _field(None, "Renamed.", flag="other")


class DataclassFlagsTest(absltest.TestCase):

  def parse(self, argv, use_field_defaults=True, **kwargs):
    flag_values = flags.FlagValues()
    dataclass_flags.define(Example, use_field_defaults=use_field_defaults,
                           flag_values=flag_values)
    flag_values(["prog"] + argv)
    return flag_values, dataclass_flags.values(
        Example, flag_values=flag_values, **kwargs)

  def test_defaults_and_kinds(self):
    flag_values, values = self.parse(["--path=/x", "--switch=false",
                                      "--scales=3,4.5", "--other=/o"])
    self.assertEqual(Example(**values), Example(
        path="/x", switch=False, scales=(3.0, 4.5), other_dir="/o"))
    self.assertIs(values["switch"], False)  # A bool, not the string "false".
    self.assertEqual(flag_values["steps"].help, "How many steps.")
    self.assertNotIn("other_dir", flag_values)

  def test_unset_flags_are_left_out_without_field_defaults(self):
    _, values = self.parse(["--rate=0.25"], use_field_defaults=False)
    self.assertEqual(values, {"rate": 0.25})

  def test_numbers_are_parsed_by_the_given_function(self):
    _, values = self.parse(["--path=p", "--scales=60,0.5"],
                           number=lambda t: int(float(t))
                           if float(t).is_integer() else float(t))
    self.assertEqual(values["scales"], (60, 0.5))
    self.assertIsInstance(values["scales"][0], int)

  def test_a_bad_number_names_the_flag(self):
    with self.assertRaisesRegex(dataclass_flags.FlagError,
                                r"^--scales must be numbers; got 1,x\.$"):
      self.parse(["--path=p", "--scales=1,x"])

  def test_training_and_landscape_settings_all_have_flags(self):
    from entropy_sgd.reports import landscape  # pylint: disable=g-import-not-at-top
    for cls in (config_lib.TrainConfig, landscape.Settings):
      flag_values = flags.FlagValues()
      dataclass_flags.define(cls, use_field_defaults=True,
                             flag_values=flag_values)
      self.assertLen(list(flag_values), len(dataclasses.fields(cls)))


if __name__ == "__main__":
  absltest.main()
