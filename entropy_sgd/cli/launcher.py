"""Command-line flags shared by the per-dataset launchers.

Every `TrainConfig` field is a flag. A flag left unset takes the value of
the preset of (dataset, `--model`, `--opt`) (see `config.preset`), so
`--opt=entropy_sgd` alone gives the published Entropy-SGD recipe and any flag
overrides one setting. `--seeds=0,1,2` runs one configuration for several
seeds, one after another; finished runs are skipped and a killed one resumes.
"""

import dataclasses
import sys

from absl import flags
from absl import logging

from entropy_sgd.cli import dataclass_flags
from entropy_sgd.core import onednn
from entropy_sgd.train import checkpoints
from entropy_sgd.train import config as config_lib
from entropy_sgd.train import preemption
from entropy_sgd.train import run_dir as run_dir_lib
from entropy_sgd.train import training
from entropy_sgd.workloads import data as data_lib
from entropy_sgd.workloads import models

def _preset_note(name, dataset):
  """The presets' values of field `name`, as " [model/opt: value, ...]"."""
  model = config_lib.DEFAULT_MODELS[dataset]
  if name == "model":
    return f" [default {model!r}]"
  values = {}
  for model_name in models.models_for(dataset):
    for opt in config_lib.OPTIMIZERS:
      recipe = config_lib.preset(dataset, model_name, opt)
      values[f"{model_name.split('-')[0]}/{opt}"] = recipe.get(
          name, getattr(config_lib.TrainConfig, name))
  if len(set(map(repr, values.values()))) == 1:
    return f" [default {next(iter(values.values()))!r}]"
  return " [" + ", ".join(f"{key}: {v!r}" for key, v in values.items()) + "]"


def define_flags(dataset: str = "cifar10",
                 flag_values: flags.FlagValues = flags.FLAGS):
  """Defines one flag per TrainConfig field, defaulting to 'from preset'.

  Also `--seeds`. Into the global flags (a launcher's), it also appends the
  preset table of `dataset` to the main module's docstring, which `--help`
  prints; tests pass their own `flag_values`.
  """
  if "log_dir" in flag_values:  # absl.logging's, for log files we never write.
    delattr(flag_values, "log_dir")
  if flag_values is flags.FLAGS:
    main = sys.modules["__main__"]
    main.__doc__ = (main.__doc__ or "") + (
        f"\nPresets (sources: docs/training.md):\n"
        f"{config_lib.describe_presets(dataset)}\n"
        f"\nThe paper's recipe (--recipe=paper), each value with its source "
        f"(Sec.: the ICLR 2017 text; see config.py):\n"
        f"{config_lib.describe_paper_recipe(dataset)}\n")
  flags.DEFINE_list(
      "seeds", None, "Run these seeds one after another (each its own run "
      "directory, named by its seed); finished runs are skipped, a killed "
      "one resumes. Overrides --seed.", flag_values=flag_values)
  flags.DEFINE_enum("opt", "nesterov", config_lib.OPTIMIZERS,
                    _help_of("opt") + _preset_note("opt", dataset),
                    flag_values=flag_values)
  dataclass_flags.define(
      config_lib.TrainConfig, use_field_defaults=False,
      skip=("dataset", "opt"),
      extra_help=lambda name: _preset_note(name, dataset),
      flag_values=flag_values)


def _help_of(name):
  return next(f.metadata[config_lib.HELP]
              for f in dataclasses.fields(config_lib.TrainConfig)
              if f.name == name)


def config_from_flags(dataset: str, flag_values: flags.FlagValues = flags.FLAGS
                      ) -> config_lib.TrainConfig:
  """The preset of --opt with every flag given on the command line."""
  try:
    overrides = dataclass_flags.values(
        config_lib.TrainConfig, skip=("dataset",), number=_int_or_float,
        flag_values=flag_values)
  except dataclass_flags.FlagError as e:
    raise config_lib.ConfigError(str(e)) from None
  opt = overrides.pop("opt")
  return config_lib.from_preset(opt, dataset=dataset, **overrides)


def _int_or_float(text: str):
  value = float(text)
  return int(value) if value.is_integer() else value


def _seeds(flag_values: flags.FlagValues):
  try:
    seeds = [int(s) for s in flag_values.seeds or []]
  except ValueError:
    raise config_lib.ConfigError(
        f"--seeds must be integers, e.g. --seeds=0,1,2; got "
        f"{','.join(flag_values.seeds)}.") from None
  if len(set(seeds)) != len(seeds):
    raise config_lib.ConfigError(f"--seeds repeats a seed: {seeds}.")
  if seeds and flag_values.run_name:
    raise config_lib.ConfigError(
        "--seeds names each run by its seed; drop --run_name.")
  return seeds


EXIT_ERROR = 1  # Bad flags or data: an `error:` line.
EXIT_DIVERGED = 3  # NaN/Inf: an `error:` line naming the last good checkpoint.
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT: checkpoint saved; rerun to resume.


def run(dataset: str, flag_values: flags.FlagValues = flags.FLAGS):
  """Main of a launcher: train, or exit non-zero with a one-line message."""
  logging.info(onednn.launcher_message())
  try:
    config = config_from_flags(dataset, flag_values)
    seeds = _seeds(flag_values)
    statistics = {}  # The seeds' runs fit the normalisation once.
    if not seeds:
      summaries = [training.train(config)]
    else:
      summaries = []
      for index, seed in enumerate(seeds):
        seed_config = dataclasses.replace(config, seed=seed)
        done = training.finished_summary(seed_config)
        if done is not None:
          logging.info("Seed %d (%d/%d) already finished in %s; skipped.",
                       seed, index + 1, len(seeds), done["run_dir"])
          summaries.append(done)
          continue
        logging.info("Seed %d (%d/%d).", seed, index + 1, len(seeds))
        summaries.append(training.train(seed_config, statistics))
  except (config_lib.ConfigError, data_lib.DataError,
          run_dir_lib.RunDirError) as e:
    _exit(EXIT_ERROR, f"error: {e}")
  except checkpoints.DivergenceError as e:
    _exit(EXIT_DIVERGED, f"error: {e}")
  except preemption.Preempted as e:
    _exit(EXIT_PREEMPTED, f"preempted: {e}")
  for summary in summaries:
    print("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()),
          flush=True)


def _exit(code: int, line: str):
  logging.flush()
  print(line, file=sys.stderr, flush=True)
  sys.exit(code)
