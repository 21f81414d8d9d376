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

from entropy_sgd.analysis import hessian
from entropy_sgd.reports import landscape
from entropy_sgd.train import config as config_lib
from entropy_sgd.train import run_dir
from entropy_sgd.train import training
from entropy_sgd.workloads import data as data_lib

_DEFAULTS = landscape.Settings(run_dir="", output_dir="")

_RUN_DIR = flags.DEFINE_string(
    "run_dir", None, "Run directory to analyse (holds config.json and "
    "checkpoints/); required.")
_COMPARE = flags.DEFINE_string(
    "compare", None, "A second run directory of the same model: adds the "
    "loss along the line from --run_dir's weights (a=0) to its weights "
    "(a=1), a in [-0.5, 1.5].")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Directory for landscape.json, landscape.md and the "
    "plots; required.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Data directory; unset: the run's --data_dir.")
_BATCHES = flags.DEFINE_integer(
    "batches", _DEFAULTS.batches, "Training batches f is averaged over; 0: "
    "every full batch of the training set.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Global batch size; unset: the run's.")
_MEASURES = flags.DEFINE_list(
    "measures", list(landscape.MEASURES), "Measures to compute, from "
    f"{','.join(landscape.MEASURES)} (interpolation needs --compare).")
_TOP_K = flags.DEFINE_integer(
    "top_k", _DEFAULTS.top_k, "Top Hessian eigenvalues (Lanczos; 1: power "
    "iteration).")
_LANCZOS_ITERATIONS = flags.DEFINE_integer(
    "lanczos_iterations", _DEFAULTS.lanczos_iterations,
    "Lanczos steps (Hessian-vector products) for the top eigenvalues.")
_PROBES = flags.DEFINE_integer(
    "probes", _DEFAULTS.probes, "Rademacher probes of Hutchinson's trace "
    "estimate.")
_DENSITY_PROBES = flags.DEFINE_integer(
    "density_probes", _DEFAULTS.density_probes,
    "Probes of stochastic Lanczos quadrature (spectral density).")
_DENSITY_ITERATIONS = flags.DEFINE_integer(
    "density_iterations", _DEFAULTS.density_iterations,
    "Lanczos steps per density probe.")
_DENSITY_SIGMA_FRACTION = flags.DEFINE_float(
    "density_sigma_fraction", _DEFAULTS.density_sigma_fraction,
    "Gaussian broadening of the density, as a fraction of the spectrum's "
    "range.")
_DENSITY_LOG_SCALE = flags.DEFINE_bool(
    "density_log_scale", _DEFAULTS.density_log_scale,
    "Plot the density on a log scale.")
_ENTROPY_GAMMAS = flags.DEFINE_list(
    "entropy_gammas", [str(g) for g in _DEFAULTS.entropy_gammas],
    "Scopes gamma of the local entropy (one estimate each).")
_ENTROPY_TEMPERATURE = flags.DEFINE_float(
    "entropy_temperature", _DEFAULTS.entropy_temperature,
    "Temperature T of the local entropy: x' spreads by sqrt(T/gamma) per "
    "weight.")
_ENTROPY_BETAS = flags.DEFINE_integer(
    "entropy_betas", _DEFAULTS.entropy_betas,
    "Gauss-Legendre nodes of the thermodynamic integration.")
_ENTROPY_STEPS = flags.DEFINE_integer(
    "entropy_steps", _DEFAULTS.entropy_steps,
    "SGLD steps averaged per node and chain.")
_ENTROPY_BURN_IN = flags.DEFINE_integer(
    "entropy_burn_in", _DEFAULTS.entropy_burn_in,
    "SGLD steps discarded per node and chain.")
_ENTROPY_CHAINS = flags.DEFINE_integer(
    "entropy_chains", _DEFAULTS.entropy_chains,
    "Independent SGLD chains (standard error over them).")
_ENTROPY_STEP_FRACTION = flags.DEFINE_float(
    "entropy_step_fraction", _DEFAULTS.entropy_step_fraction,
    "SGLD step = this / (gamma + beta lambda_max).")
_EPSILON = flags.DEFINE_float(
    "epsilon", _DEFAULTS.epsilon, "Box size of epsilon-sharpness: "
    "|y_i| <= epsilon (|x_i| + 1).")
_SHARPNESS_STEPS = flags.DEFINE_integer(
    "sharpness_steps", _DEFAULTS.sharpness_steps,
    "Projected gradient-ascent steps of epsilon-sharpness.")
_ADAPTIVE_RHO = flags.DEFINE_float(
    "adaptive_rho", _DEFAULTS.adaptive_rho, "Adaptive sharpness radius: "
    "|d_i| <= rho |w_i| (worst case), d_i ~ N(0, rho^2 w_i^2) (average).")
_ADAPTIVE_STEPS = flags.DEFINE_integer(
    "adaptive_steps", _DEFAULTS.adaptive_steps,
    "Projected ascent steps of worst-case adaptive sharpness.")
_ADAPTIVE_SAMPLES = flags.DEFINE_integer(
    "adaptive_samples", _DEFAULTS.adaptive_samples,
    "Gaussian draws of average adaptive sharpness (its standard error).")
_PAC_BAYES_MAX_ERROR_INCREASE = flags.DEFINE_float(
    "pac_bayes_max_error_increase", _DEFAULTS.pac_bayes_max_error_increase,
    "PAC-Bayes flatness: allowed mean training-error increase.")
_PAC_BAYES_EPSILON = flags.DEFINE_float(
    "pac_bayes_epsilon", _DEFAULTS.pac_bayes_epsilon,
    "PAC-Bayes flatness: eps in u ~ N(0, sigma'^2 w^2 + eps^2).")
_PAC_BAYES_SAMPLES = flags.DEFINE_integer(
    "pac_bayes_samples", _DEFAULTS.pac_bayes_samples,
    "PAC-Bayes flatness: draws per bisection step.")
_PAC_BAYES_BISECTIONS = flags.DEFINE_integer(
    "pac_bayes_bisections", _DEFAULTS.pac_bayes_bisections,
    "PAC-Bayes flatness: bisection steps in log sigma'.")
_DIRECTION_POINTS = flags.DEFINE_integer(
    "direction_points", _DEFAULTS.direction_points,
    "Points along the 1-D filter-normalised direction.")
_DIRECTION_RANGE = flags.DEFINE_float(
    "direction_range", _DEFAULTS.direction_range,
    "Directions are plotted for a (and b) in [-range, range].")
_PLANE_POINTS = flags.DEFINE_integer(
    "plane_points", _DEFAULTS.plane_points,
    "Points per axis of the 2-D plot.")
_INTERPOLATION_POINTS = flags.DEFINE_integer(
    "interpolation_points", _DEFAULTS.interpolation_points,
    "Points on the line between --run_dir and --compare.")
_HVP_METHOD = flags.DEFINE_enum(
    "hvp_method", _DEFAULTS.hvp_method, list(hessian.HVP_METHODS),
    "Hessian-vector products by forward-over-backward or double backprop.")
_SEED = flags.DEFINE_integer("seed", _DEFAULTS.seed,
                             "Seed of probes, directions and SGLD noise.")
_STRATEGY = flags.DEFINE_enum(
    "strategy", "default", ["default", "mirrored"],
    "default (one device) or mirrored (all local GPUs, else --num_devices "
    "logical CPUs).")
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", 2, "Logical CPU devices for --strategy=mirrored without "
    "GPUs.")


def _settings() -> landscape.Settings:
  for flag in (_RUN_DIR, _OUTPUT_DIR):
    if not flag.value:
      raise landscape.LandscapeError(
          f"--{flag.name} is required, e.g. --run_dir=runs/"
          f"mnist_mnistfc_sgd_seed0 --output_dir=flatness.")
  try:
    gammas = tuple(float(g) for g in _ENTROPY_GAMMAS.value)
  except ValueError:
    raise landscape.LandscapeError(
        f"--entropy_gammas must be numbers; got "
        f"{','.join(_ENTROPY_GAMMAS.value)}.") from None
  resolve = run_dir.resolve_user_path
  return landscape.Settings(
      run_dir=resolve(_RUN_DIR.value), output_dir=resolve(_OUTPUT_DIR.value),
      compare_dir=resolve(_COMPARE.value), data_dir=resolve(_DATA_DIR.value),
      batches=_BATCHES.value, batch_size=_BATCH_SIZE.value,
      measures=tuple(_MEASURES.value), top_k=_TOP_K.value,
      lanczos_iterations=_LANCZOS_ITERATIONS.value, probes=_PROBES.value,
      density_probes=_DENSITY_PROBES.value,
      density_iterations=_DENSITY_ITERATIONS.value,
      density_sigma_fraction=_DENSITY_SIGMA_FRACTION.value,
      density_log_scale=_DENSITY_LOG_SCALE.value, entropy_gammas=gammas,
      entropy_temperature=_ENTROPY_TEMPERATURE.value,
      entropy_betas=_ENTROPY_BETAS.value, entropy_steps=_ENTROPY_STEPS.value,
      entropy_burn_in=_ENTROPY_BURN_IN.value,
      entropy_chains=_ENTROPY_CHAINS.value,
      entropy_step_fraction=_ENTROPY_STEP_FRACTION.value,
      epsilon=_EPSILON.value, sharpness_steps=_SHARPNESS_STEPS.value,
      adaptive_rho=_ADAPTIVE_RHO.value, adaptive_steps=_ADAPTIVE_STEPS.value,
      adaptive_samples=_ADAPTIVE_SAMPLES.value,
      pac_bayes_max_error_increase=_PAC_BAYES_MAX_ERROR_INCREASE.value,
      pac_bayes_epsilon=_PAC_BAYES_EPSILON.value,
      pac_bayes_samples=_PAC_BAYES_SAMPLES.value,
      pac_bayes_bisections=_PAC_BAYES_BISECTIONS.value,
      direction_points=_DIRECTION_POINTS.value,
      direction_range=_DIRECTION_RANGE.value,
      plane_points=_PLANE_POINTS.value,
      interpolation_points=_INTERPOLATION_POINTS.value,
      hvp_method=_HVP_METHOD.value, seed=_SEED.value)


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
    strategy = training.make_strategy(config_lib.TrainConfig(  # TF not up.
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
