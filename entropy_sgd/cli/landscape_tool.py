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


def _summary(results) -> str:
  parts = []
  if "hessian_top_eigenvalues" in results:
    parts.append(f"lambda_max {results['hessian_top_eigenvalues'][0]:.4g}")
  if "hessian_trace" in results:
    parts.append(f"trace {results['hessian_trace']:.4g} +- "
                 f"{results['hessian_trace_stderr']:.2g}")
  if "local_entropy_deficit" in results:
    parts.append(f"local-entropy deficit "
                 f"{results['local_entropy_deficit']:.4g} nats")
  if "epsilon_sharpness" in results:
    parts.append(f"epsilon-sharpness {results['epsilon_sharpness']:.4g}%")
  if "adaptive_sharpness_worst" in results:
    parts.append(f"adaptive sharpness {results['adaptive_sharpness_worst']:.4g}"
                 f" (average {results['adaptive_sharpness_average']:.4g})")
  if "pac_bayes_sigma" in results:
    parts.append(f"PAC-Bayes sigma' {results['pac_bayes_sigma']:.4g}")
  return ", ".join(parts)


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
