"""The flags and entry point of //launch:landscape (see its docstring)."""

import sys

from absl import flags
from absl import logging

from entropy_sgd.cli import dataclass_flags
from entropy_sgd.reports import landscape
from entropy_sgd.train import cluster
from entropy_sgd.train import config as config_lib
from entropy_sgd.train import run_dir
from entropy_sgd.workloads import data as data_lib


def define_flags(flag_values: flags.FlagValues = flags.FLAGS):
  """`landscape.Settings`' flags, plus the strategy's, on `flag_values`."""
  dataclass_flags.define(landscape.Settings, use_field_defaults=True,
                         flag_values=flag_values)
  flags.DEFINE_enum(
      "strategy", "default", ["default", "mirrored"],
      "default (one device) or mirrored (all local GPUs, else --num_devices "
      "logical CPUs).", flag_values=flag_values)
  flags.DEFINE_integer(
      "num_devices", 2, "Logical CPU devices for --strategy=mirrored without "
      "GPUs.", flag_values=flag_values)


def _settings(flag_values: flags.FlagValues) -> landscape.Settings:
  for name in ("run_dir", "output_dir"):
    if not flag_values[name].value:
      raise landscape.LandscapeError(
          f"--{name} is required, e.g. --run_dir=runs/"
          f"mnist_mnistfc_sgd_seed0 --output_dir=flatness.")
  try:
    values = dataclass_flags.values(landscape.Settings,
                                    flag_values=flag_values)
  except dataclass_flags.FlagError as e:
    raise landscape.LandscapeError(str(e)) from None
  for name in ("run_dir", "output_dir", "compare_dir", "data_dir"):
    values[name] = run_dir.resolve_user_path(values.get(name))
  return landscape.Settings(**values)


# One-line summary parts: (key in the results, its text).
_SUMMARY_PARTS = (
    ("hessian_top_eigenvalues",
     lambda r: f"lambda_max {r['hessian_top_eigenvalues'][0]:.4g}"),
    ("hessian_trace", lambda r: f"trace {r['hessian_trace']:.4g} +- "
                                f"{r['hessian_trace_stderr']:.2g}"),
    ("local_entropy_deficit", lambda r: f"local-entropy deficit "
                                        f"{r['local_entropy_deficit']:.4g} nats"),
    ("epsilon_sharpness",
     lambda r: f"epsilon-sharpness {r['epsilon_sharpness']:.4g}%"),
    ("adaptive_sharpness_worst",
     lambda r: f"adaptive sharpness {r['adaptive_sharpness_worst']:.4g} "
               f"(average {r['adaptive_sharpness_average']:.4g})"),
    ("pac_bayes_sigma", lambda r: f"PAC-Bayes sigma' {r['pac_bayes_sigma']:.4g}"),
)


def _summary(results) -> str:
  return ", ".join(text(results) for key, text in _SUMMARY_PARTS
                   if key in results)


def _fail(message: str):
  logging.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(1)


def run(flag_values: flags.FlagValues = flags.FLAGS):
  """Measures the run of parsed `flag_values`; bad input: one `error:`
  line and exit 1."""
  try:
    settings = _settings(flag_values)
    strategy = cluster.make_strategy(config_lib.TrainConfig(  # TF not up.
        strategy=flag_values["strategy"].value,
        num_devices=flag_values["num_devices"].value))
    results = landscape.analyse(settings, strategy)
  except (landscape.LandscapeError, config_lib.ConfigError,
          data_lib.DataError) as e:
    _fail(str(e))
  except OSError as e:
    _fail(f"cannot write to --output_dir ({e.strerror or e}).")
  for name in ["landscape.json", "landscape.md"] + sorted(
      results["plots"].values()):
    print(f"wrote {settings.output_dir}/{name}")
  print(f"landscape: {_summary(results)}", flush=True)
