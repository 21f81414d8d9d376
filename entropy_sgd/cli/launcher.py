"""Command-line flags shared by the per-dataset launchers.

Every `TrainConfig` field is a flag. A flag left unset takes the value of
the preset of (dataset, `--model`, `--opt`) (see `config.preset`), so
`--opt=entropy_sgd` alone gives the published Entropy-SGD recipe and any flag
overrides one setting. `--seeds=0,1,2` runs one configuration for several
seeds, one after another; finished runs are skipped and a killed one resumes.
"""

import dataclasses
import sys
import typing

from absl import flags
from absl import logging

from entropy_sgd.core import onednn
from entropy_sgd.train import config as config_lib
from entropy_sgd.train import run_dir as run_dir_lib
from entropy_sgd.train import training
from entropy_sgd.workloads import data as data_lib
from entropy_sgd.workloads import models

_HELP = {
    "dataset": "Dataset (set by the launcher).",
    "data_dir": "Local copy: a folder holding cifar-10-batches-bin/ or "
                "cifar-100-binary/ (plain or .gz), or the four MNIST IDX "
                "files (plain or .gz). Unset: tensorflow-datasets.",
    "log_dir": "Parent of the run directories (TensorBoard, checkpoints).",
    "run_name": "Run directory under --log_dir; unset: derived from dataset, "
                "model, opt, L and seed. An existing run resumes.",
    "model": "mnistfc or lenet (MNIST; mnistfc-iclr17 and lenet-iclr17: as "
             "the paper's runs built them), allcnn (All-CNN-BN) or Wide ResNet "
             "wrn-DEPTH-WIDTH, e.g. wrn-28-10 or wrn-16-1 (CIFAR). Unset: "
             "the dataset's default.",
    "dropout": "Dropout rate: inside the WRN blocks (default 0), after the "
               "hidden layers of mnistfc/lenet/allcnn (default 0.5).",
    "init": "Initialisation of the paper's nets: he (He-normal, Glorot "
            "logits) or torch (Torch7's default reset(): U(+-1/sqrt(fan_in)) "
            "weights and biases, BatchNorm scale U(0, 1)). Unset: the "
            "model's own (torch for the -iclr17 nets).",
    "recipe": "Which published recipe fills the unset flags: "
              "reference_code (the public ucla-vision/entropy-sgd code) or "
              "paper (the ICLR 2017 text, and the January 2017 Lua code of "
              "its runs where the text is silent). See docs/training.md.",
    "opt": "Optimizer: sgd (heavy-ball momentum --momentum), nesterov, adam "
           "(Torch's optim.adam), sam (sharpness-aware, Nesterov base, 2 "
           "gradient evaluations per step) or entropy_sgd. Chooses the "
           "preset of every unset flag.",
    "sam_rho": "SAM: neighbourhood radius rho. Unset: 0.05 (SAM), 0.5 "
               "(--sam_adaptive).",
    "sam_adaptive": "SAM: adaptive SAM (ASAM), eps = rho T^2 g / ||T g|| "
                    "with T = |w| + --sam_eta.",
    "sam_eta": "ASAM: eta in T = |w| + eta.",
    "sam_perturbation": "SAM under several replicas: per_replica (each "
                        "replica ascends along its own gradient, "
                        "m-sharpness, as Foret et al.) or synchronized "
                        "(along the all-reduced gradient).",
    "adam_beta1": "Adam: decay of the first-moment average.",
    "adam_beta2": "Adam: decay of the second-moment average.",
    "adam_epsilon": "Adam: added to sqrt(v) before the bias correction "
                    "(Torch's placement).",
    "preprocess": "CIFAR input normalisation: standardize (per-channel "
                  "mean and std of the training images) or gcn_zca (global "
                  "contrast normalisation, then ZCA whitening fitted on the "
                  "training split; the paper's Sec. 5.2).",
    "epochs": "Outer epochs (train_examples / batch_size outer steps each; "
              "an Entropy-SGD epoch is L passes over the data).",
    "batch_size": "Global minibatch size (split over replicas).",
    "lr": "Learning rate (Entropy-SGD: the outer rate eta).",
    "lr_decay_epochs": "Outer epochs (fractions allowed) at which the "
                       "learning rate is "
                       "multiplied by --lr_decay_factor.",
    "lr_decay_factor": "Learning-rate decay factor.",
    "momentum": "Momentum of sgd/nesterov (Entropy-SGD takes its momentum "
                "from --conventions).",
    "weight_decay": "L2 weight decay (Entropy-SGD: in the Langevin steps).",
    "L": "Entropy-SGD: Langevin steps (gradient evaluations) per update.",
    "langevin_lr": "Entropy-SGD: SGLD step size eta'.",
    "noise": "Entropy-SGD: thermal noise eps.",
    "gamma": "Entropy-SGD: initial scope gamma0.",
    "scoping": "Entropy-SGD: gamma1; gamma_t = gamma0 (1 + gamma1)^t.",
    "alpha": "Entropy-SGD: running-mean weight (meaning set by "
             "--conventions).",
    "conventions": "Entropy-SGD: paper, lua_reference or pytorch_reference "
                   "(docs/conventions.md).",
    "outer_weight_decay": "Entropy-SGD: add the weight decay to the outer "
                          "step's direction too (true) or keep it in the "
                          "inner loop only (false). Unset: the "
                          "--conventions' own (only pytorch_reference adds "
                          "it).",
    "parle": "Entropy-SGD: Parle mode; each replica runs its own chain and "
             "the replicas average elastically once per outer step.",
    "rho": "Parle: coupling rho0 of the replicas to their mean (inf: exact "
           "averaging).",
    "rho_scoping": "Parle: rho_t = rho0 (1 + rho_scoping)^t.",
    "seed": "Seed of initialisation, data order, augmentation and noise.",
    "jit": "Compile the per-replica step with XLA.",
    "noise_kernel": "Entropy-SGD: which implementation draws the Langevin "
                    "noise. auto: the compiled CPU kernel when it loads and "
                    "applies (no GPU, no --jit, no TPU), else TensorFlow's "
                    "ops; on: the kernel, or stop with one line saying why "
                    "not; off: TensorFlow's ops. The two draw the same "
                    "distribution but differ at float round-off, so the "
                    "resolved choice is logged and recorded in config.json, "
                    "and a resume that would switch it is refused. "
                    "ENTROPY_SGD_NOISE_KERNEL=PATH loads that library "
                    "instead of the packaged one.",
    "precision": "float32; mixed_bfloat16 (forward and backward passes in "
                 "bfloat16, fast on CPUs with AVX512_BF16, TPUs and recent "
                 "GPUs); or mixed_float16 (float16 with dynamic loss "
                 "scaling, for GPUs). Parameters, optimizer state (x, mu, "
                 "momenta), BatchNorm statistics and the loss stay float32. "
                 "See docs/mixed_precision.md.",
    "max_steps": "Stop after this many outer steps in total (then evaluate "
                 "and checkpoint); for smoke runs.",
    "strategy": "default (one device); mirrored (all local GPUs, else "
                "--num_devices logical CPUs); multi_worker "
                "(MultiWorkerMirroredStrategy over the workers in TF_CONFIG, "
                "all GPUs of each, else one CPU each); tpu (TPUStrategy on "
                "--tpu). See docs/scaling_out.md.",
    "num_devices": "Logical CPU devices for --strategy=mirrored without GPUs.",
    "tpu": "--strategy=tpu: TPU name or grpc://HOST:8470 address for "
           "TPUClusterResolver; empty: the local TPU (Cloud TPU VM).",
    "sync_batch_norm": "Synchronised BatchNorm: batch statistics of the "
                       "global batch (all replicas) instead of each "
                       "replica's share.",
    "validation_examples": "Hold out the last N training images as a clean "
                           "validation split.",
    "augment": "Training augmentation: flip_crop (WRN standard), flip_rotate "
               "(TF1 project), flip_crop_rotate or none.",
    "rotation_degrees": "Maximum rotation angle of flip_rotate augmentation.",
    "recalibrate_bn": "Entropy-SGD: recompute BatchNorm statistics at the "
                      "anchor weights before each evaluation.",
    "recalibration_batches": "Batches fed to recompute BatchNorm statistics.",
    "log_every_steps": "Log and summarise every N outer steps.",
    "steps_per_loop": "Outer steps per compiled call (fewer Python round "
                      "trips on small models). Logging, the NaN check, "
                      "evaluation and checkpoints happen between calls.",
    "eval_every_steps": "Also evaluate and checkpoint every N outer steps "
                        "(besides every epoch).",
    "track_flatness_every_steps": "Every N outer steps, log "
                                  "flatness/lambda_max and "
                                  "flatness/hessian_trace at x: 10 power and "
                                  "10 Hutchinson iterations of the Hessian on "
                                  "2 fixed training batches "
                                  "(docs/flatness.md). Unset: off.",
    "keep_checkpoints": "Checkpoints kept in the run directory.",
    "deterministic": "Enable TF op determinism (bit-reproducible, slower).",
    "allow_config_change": "Resume a run under settings that define another "
                           "experiment (e.g. a new --lr); the change is "
                           "logged and recorded in config.json with its "
                           "step. Without it such a resume is refused.",
}


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


def define_flags(dataset: str = "cifar10"):
  """Defines one flag per TrainConfig field, defaulting to 'from preset'.

  Also `--seeds`, and appends the preset table of `dataset` to the main
  module's docstring, which `--help` prints.
  """
  if "log_dir" in flags.FLAGS:  # absl.logging's, for log files we never write.
    delattr(flags.FLAGS, "log_dir")
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
      "one resumes. Overrides --seed.")
  hints = typing.get_type_hints(config_lib.TrainConfig)
  for field in dataclasses.fields(config_lib.TrainConfig):
    name, hint = field.name, hints[field.name]
    if name == "dataset":
      continue
    help_text = _HELP[name] + _preset_note(name, dataset)
    if name == "opt":
      flags.DEFINE_enum(name, "nesterov", config_lib.OPTIMIZERS, help_text)
    elif hint is bool:
      flags.DEFINE_bool(name, None, help_text)
    elif hint is int or hint == typing.Optional[int]:
      flags.DEFINE_integer(name, None, help_text)
    elif hint is float or hint == typing.Optional[float]:
      flags.DEFINE_float(name, None, help_text)
    elif hint == typing.Tuple[float, ...]:
      flags.DEFINE_list(name, None, help_text)
    else:
      flags.DEFINE_string(name, None, help_text)


def config_from_flags(dataset: str) -> config_lib.TrainConfig:
  """The preset of --opt with every flag given on the command line."""
  values = flags.FLAGS.flag_values_dict()
  overrides = {}
  for field in dataclasses.fields(config_lib.TrainConfig):
    if field.name in values and values[field.name] is not None:
      overrides[field.name] = values[field.name]
  if "lr_decay_epochs" in overrides:
    try:
      overrides["lr_decay_epochs"] = tuple(
          _int_or_float(e) for e in overrides["lr_decay_epochs"])
    except ValueError:
      raise config_lib.ConfigError(
          f"--lr_decay_epochs must be numbers; got "
          f"{','.join(overrides['lr_decay_epochs'])}.") from None
  opt = overrides.pop("opt")
  return config_lib.from_preset(opt, dataset=dataset, **overrides)


def _int_or_float(text: str):
  value = float(text)
  return int(value) if value.is_integer() else value


def _seeds():
  try:
    seeds = [int(s) for s in flags.FLAGS.seeds or []]
  except ValueError:
    raise config_lib.ConfigError(
        f"--seeds must be integers, e.g. --seeds=0,1,2; got "
        f"{','.join(flags.FLAGS.seeds)}.") from None
  if len(set(seeds)) != len(seeds):
    raise config_lib.ConfigError(f"--seeds repeats a seed: {seeds}.")
  if seeds and flags.FLAGS.run_name:
    raise config_lib.ConfigError(
        "--seeds names each run by its seed; drop --run_name.")
  return seeds


EXIT_ERROR = 1  # Bad flags or data: an `error:` line.
EXIT_DIVERGED = 3  # NaN/Inf: an `error:` line naming the last good checkpoint.
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT: checkpoint saved; rerun to resume.


def run(dataset: str):
  """Main of a launcher: train, or exit non-zero with a one-line message."""
  logging.info(onednn.launcher_message())
  try:
    config = config_from_flags(dataset)
    seeds = _seeds()
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
  except training.DivergenceError as e:
    _exit(EXIT_DIVERGED, f"error: {e}")
  except training.Preempted as e:
    _exit(EXIT_PREEMPTED, f"preempted: {e}")
  for summary in summaries:
    print("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()),
          flush=True)


def _exit(code: int, line: str):
  logging.flush()
  print(line, file=sys.stderr, flush=True)
  sys.exit(code)
