"""One absl flag per field of a settings dataclass, and the values back.

A field's help is its `metadata[config.HELP]`; its flag's kind follows the
type hint (bool, int, float, str, their Optional forms, and tuples of floats
or strings as comma-separated lists); `metadata[config.FLAG]` renames the
flag.
The training launchers (TrainConfig) and //launch:landscape (Settings) use
it, so a setting is declared once, where its dataclass is.
"""

import dataclasses
import typing
from typing import Any, Callable, Collection, Dict, Optional

from absl import flags

from entropy_sgd.train import config as config_lib

HELP = config_lib.HELP
FLAG = config_lib.FLAG

_FLOATS = typing.Tuple[float, ...]
_STRINGS = typing.Tuple[str, ...]


class FlagError(ValueError):
  """A flag's value does not fit its field; the message names the flag."""


def flag_name(field: dataclasses.Field) -> str:
  return field.metadata.get(FLAG, field.name)


def _fields(cls, skip: Collection[str]):
  hints = typing.get_type_hints(cls)
  return [(field, hints[field.name]) for field in dataclasses.fields(cls)
          if field.name not in skip]


def define(cls, *, use_field_defaults: bool, skip: Collection[str] = (),
           extra_help: Callable[[str], str] = lambda name: "",
           flag_values: flags.FlagValues = flags.FLAGS):
  """Defines the flags of `cls`'s fields (except `skip`).

  With `use_field_defaults`, a flag defaults to its field's default (None
  for a required field); otherwise to None ("unset": the caller fills it,
  e.g. from a preset). `extra_help(name)` is appended to each help text.
  """
  for field, hint in _fields(cls, skip):
    name = flag_name(field)
    help_text = field.metadata[HELP] + extra_help(field.name)
    default = None
    if use_field_defaults and field.default is not dataclasses.MISSING:
      default = field.default
    if hint is bool or hint == Optional[bool]:
      flags.DEFINE_bool(name, default, help_text, flag_values=flag_values)
    elif hint is int or hint == Optional[int]:
      flags.DEFINE_integer(name, default, help_text, flag_values=flag_values)
    elif hint is float or hint == Optional[float]:
      flags.DEFINE_float(name, default, help_text, flag_values=flag_values)
    elif hint in (_FLOATS, _STRINGS):
      flags.DEFINE_list(name, None if default is None else
                        [str(v) for v in default], help_text,
                        flag_values=flag_values)
    elif hint is str or hint == Optional[str]:
      flags.DEFINE_string(name, default, help_text, flag_values=flag_values)
    else:
      raise TypeError(f"{cls.__name__}.{field.name}: no flag kind for "
                      f"{hint}")


def values(cls, *, skip: Collection[str] = (),
           number: Callable[[str], Any] = float,
           flag_values: flags.FlagValues = flags.FLAGS) -> Dict[str, Any]:
  """{field name: value} of the flags that are set (not None), lists as
  tuples (numbers parsed by `number`); raises FlagError on a bad number."""
  given = flag_values.flag_values_dict()
  result = {}
  for field, hint in _fields(cls, skip):
    value = given.get(flag_name(field))
    if value is None:
      continue
    if hint == _FLOATS:
      try:
        value = tuple(number(v) for v in value)
      except ValueError:
        raise FlagError(f"--{flag_name(field)} must be numbers; got "
                        f"{','.join(value)}.") from None
    elif hint == _STRINGS:
      value = tuple(value)
    result[field.name] = value
  return result
