"""Flatness diagnostics of a trained run: Hessian spectrum and trace, local
entropy, epsilon-sharpness, filter-normalised directions, interpolation.

    bazel run //launch:landscape -- --run_dir=runs/RUN --output_dir=flat
    bazel run //launch:landscape -- --run_dir=runs/SGD_RUN \\
        --compare=runs/ENTROPY_SGD_RUN --output_dir=flat --batches=20

Reads RUN/config.json and the latest checkpoint in RUN/checkpoints, and
writes OUTPUT_DIR/landscape.json, OUTPUT_DIR/landscape.md and PNG plots
(see `entropy_sgd.reports.landscape`). Every measure is of the mean training
cross-entropy over --batches un-augmented training batches, with BatchNorm
statistics recalibrated at the checkpoint's weights.
"""

from entropy_sgd.core import onednn  # First: before anything imports TensorFlow.

onednn.enable_before_tensorflow()

import sys

from absl import app
from absl import flags
from absl import logging

from entropy_sgd.cli import dataclass_flags
from entropy_sgd.reports import landscape
from entropy_sgd.train import cluster
from entropy_sgd.train import config as config_lib
from entropy_sgd.train import run_dir
from entropy_sgd.workloads import data as data_lib

dataclass_flags.define(landscape.Settings, use_field_defaults=True)
_STRATEGY = flags.DEFINE_enum(
    "strategy", "default", ["default", "mirrored"],
    "default (one device) or mirrored (all local GPUs, else --num_devices "
    "logical CPUs).")
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", 2, "Logical CPU devices for --strategy=mirrored without "
    "GPUs.")


def _settings() -> landscape.Settings:
  for name in ("run_dir", "output_dir"):
    if not flags.FLAGS[name].value:
      raise landscape.LandscapeError(
          f"--{name} is required, e.g. --run_dir=runs/"
          f"mnist_mnistfc_sgd_seed0 --output_dir=flatness.")
  try:
    values = dataclass_flags.values(landscape.Settings)
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


def main(argv):
  del argv
  try:
    settings = _settings()
    strategy = cluster.make_strategy(config_lib.TrainConfig(  # TF not up.
        strategy=_STRATEGY.value, num_devices=_NUM_DEVICES.value))
    results = landscape.analyse(settings, strategy)
  except (landscape.LandscapeError, config_lib.ConfigError,
          data_lib.DataError) as e:
    logging.flush()
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  except OSError as e:
    logging.flush()
    print(f"error: cannot write to --output_dir ({e.strerror or e}).",
          file=sys.stderr, flush=True)
    sys.exit(1)
  for name in ["landscape.json", "landscape.md"] + sorted(
      results["plots"].values()):
    print(f"wrote {settings.output_dir}/{name}")
  print(f"landscape: {_summary(results)}", flush=True)


if __name__ == "__main__":
  app.run(main)
