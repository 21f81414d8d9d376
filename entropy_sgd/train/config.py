"""Training configuration, presets and validation.

`TrainConfig` holds every setting of a run. The presets are the published
recipes, one per (dataset, model, optimizer), like the TF1 project's
`config_train`; every field can be overridden (the launchers map each flag to
a field). `preset(dataset, model, opt)` looks one up; `describe_presets`
prints them with their sources (the launchers' `--help` shows it).

Sources of the CIFAR Wide ResNet presets (`PRESETS`):
* SGD (heavy-ball momentum; --momentum=0 for plain SGD) / Nesterov: Zagoruyko & Komodakis, "Wide Residual Networks" (2016),
  Sec. 3 and their reference code: WRN-28-10, 200 epochs, batch 128,
  lr 0.1 multiplied by 0.2 at epochs 60, 120 and 160, Nesterov momentum 0.9,
  weight decay 5e-4. The Entropy-SGD paper's SGD baselines use this recipe.
* Entropy-SGD: Chaudhari et al. (ICLR 2017, final arXiv version) Sec. 5 and
  ucla-vision/entropy-sgd (`python/train.py`, `train.lua`): L = 20,
  eta' = 0.1, eps = 1e-4, gamma0 = 0.03, gamma1 = 1e-3, outer lr 1 divided by
  5 every 4 epochs, 10 epochs, with the reference code's conventions
  (outer step scale 1 and Nesterov inner momentum: lr = 1 is tuned for them).
  An Entropy-SGD epoch is N / batch outer steps, i.e. L passes over the data.
"""

import dataclasses
from typing import Optional, Tuple

from entropy_sgd.core import noise as noise_lib
from entropy_sgd.core import optimizers
from entropy_sgd.core import precision
from entropy_sgd.workloads import data as data_lib
from entropy_sgd.workloads import models
from entropy_sgd.workloads import wide_resnet

OPTIMIZERS = ("sgd", "nesterov", "adam", "sam", "entropy_sgd")
# "reference_code": the public ucla-vision/entropy-sgd code (today's presets);
# "paper": the ICLR 2017 text, and the January 2017 Lua code of its runs
# (pratikac/explore-hessian) where the text is silent.
RECIPES = ("reference_code", "paper")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
AUGMENTATIONS = data_lib.AUGMENTATIONS
NOISE_KERNEL_CHOICES = noise_lib.CHOICES
DATASETS = tuple(data_lib.DATASETS)
DEFAULT_MODELS = {"cifar10": "wrn-28-10", "cifar100": "wrn-28-10",
                  "mnist": "lenet"}
PAPER_DEFAULT_MODELS = {"cifar10": "allcnn", "cifar100": "allcnn",
                        "mnist": "lenet-iclr17"}
PREPROCESSING = data_lib.PREPROCESSING


class ConfigError(ValueError):
  """An invalid setting; the message names it and says how to fix it."""


# What each TrainConfig field says about itself (its dataclasses metadata):
# the flag's help; when a run reads it (a predicate of the settings dict);
# whether it tells experiments apart; whether it moves the weights (an
# evaluation setting only changes what the run reports); whether a resume
# may change it. The flags, --helpfull, the results' grouping, the flatness
# report's and the resume check derive from it.
HELP = "help"  # Also of other settings dataclasses (landscape.Settings).
FLAG = "flag"  # Optional: the flag's name, when it is not the field's.
READ_WHEN = "read_when"
EXPERIMENT = "experiment"
MOVES_WEIGHTS = "moves_weights"
RESUME_MAY_CHANGE_KEY = "resume_may_change"
# Optional: for a field added after runs were recorded, the value the code
# behaved as before it existed (a record without the field means it).
ABSENT_MEANS = "absent_means"


def _always(unused_values) -> bool:
  return True


def _entropy_sgd(values) -> bool:
  return values.get("opt") == "entropy_sgd"


def _parle(values) -> bool:
  return _entropy_sgd(values) and bool(values.get("parle"))


def _momentum_optimizer(values) -> bool:
  return values.get("opt") not in ("entropy_sgd", "adam")


def _adam(values) -> bool:
  return values.get("opt") == "adam"


def _sam(values) -> bool:
  return values.get("opt") == "sam"


def _adaptive_sam(values) -> bool:
  return _sam(values) and bool(values.get("sam_adaptive"))


def _mirrored(values) -> bool:
  return values.get("strategy") == "mirrored"


def _rotating(values) -> bool:
  return "rotate" in str(values.get("augment", ""))


def _recalibrating_augmented(values) -> bool:
  return (_entropy_sgd(values) and bool(values.get("recalibrate_bn", True))
          and values.get("augment") != "none")


def _field(default, help_text: str, *, read_when=_always,
           experiment: bool = True, moves_weights: bool = True,
           resume_may_change: bool = False, absent_means=dataclasses.MISSING):
  """A TrainConfig field with its metadata (see HELP, READ_WHEN, ...)."""
  metadata = {HELP: help_text, READ_WHEN: read_when, EXPERIMENT: experiment,
              MOVES_WEIGHTS: moves_weights,
              RESUME_MAY_CHANGE_KEY: resume_may_change}
  if absent_means is not dataclasses.MISSING:
    metadata[ABSENT_MEANS] = absent_means
  return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run needs. Epoch counts are outer epochs."""
  dataset: str = _field(
      "cifar10",
      "Dataset (set by the launcher).")
  data_dir: Optional[str] = _field(
      None,
      "Local copy: a folder holding cifar-10-batches-bin/ or "
      "cifar-100-binary/ (plain or .gz), or the four MNIST IDX "
      "files (plain or .gz). Unset: tensorflow-datasets.",
      experiment=False, resume_may_change=True)
  log_dir: str = _field(
      "runs",
      "Parent of the run directories (TensorBoard, checkpoints).",
      experiment=False, resume_may_change=True)
  run_name: Optional[str] = _field(
      None,
      "Run directory under --log_dir; unset: derived from dataset, "
      "model, opt, L and seed. An existing run resumes.",
      experiment=False, resume_may_change=True)
  model: str = _field(
      "wrn-28-10",
      "mnistfc or lenet (MNIST; mnistfc-iclr17 and lenet-iclr17: as "
      "the paper's runs built them), allcnn (All-CNN-BN) or Wide "
      "ResNet wrn-DEPTH-WIDTH, e.g. wrn-28-10 or wrn-16-1 (CIFAR). "
      "Unset: the dataset's default.")
  dropout: Optional[float] = _field(
      None,  # None: the model's own (models.py).
      "Dropout rate: inside the WRN blocks (default 0), after the "
      "hidden layers of mnistfc/lenet/allcnn (default 0.5).")
  init: Optional[str] = _field(
      None,  # None: the model's own (models.py).
      "Initialisation of the paper's nets: he (He-normal, Glorot "
      "logits) or torch (Torch7's default reset(): "
      "U(+-1/sqrt(fan_in)) weights and biases, BatchNorm scale U(0, "
      "1)). Unset: the model's own (torch for the -iclr17 nets).")
  recipe: str = _field(
      "reference_code",
      "Which published recipe fills the unset flags: reference_code "
      "(the public ucla-vision/entropy-sgd code) or paper (the ICLR "
      "2017 text, and the January 2017 Lua code of its runs where "
      "the text is silent). See docs/training.md.")
  opt: str = _field(
      "nesterov",
      "Optimizer: sgd (heavy-ball momentum --momentum), nesterov, "
      "adam (Torch's optim.adam), sam (sharpness-aware, Nesterov "
      "base, 2 gradient evaluations per step) or entropy_sgd. "
      "Chooses the preset of every unset flag.")
  epochs: int = _field(
      200,
      "Outer epochs (train_examples / batch_size outer steps each; "
      "an Entropy-SGD epoch is L passes over the data).",
      resume_may_change=True)
  batch_size: int = _field(
      128,
      "Global minibatch size (split over replicas).")
  lr: float = _field(
      0.1,
      "Learning rate (Entropy-SGD: the outer rate eta).")
  lr_decay_epochs: Tuple[float, ...] = _field(
      (60, 120, 160),
      "Outer epochs (fractions allowed) at which the learning rate "
      "is multiplied by --lr_decay_factor.")
  lr_decay_factor: float = _field(
      0.2,
      "Learning-rate decay factor.")
  momentum: float = _field(
      0.9,
      "Momentum of sgd/nesterov (Entropy-SGD takes its momentum "
      "from --conventions).",
      read_when=_momentum_optimizer)
  weight_decay: float = _field(
      5e-4,
      "L2 weight decay (Entropy-SGD: in the Langevin steps).")
  adam_beta1: float = _field(
      0.9,
      "Adam: decay of the first-moment average.",
      read_when=_adam)
  adam_beta2: float = _field(
      0.999,
      "Adam: decay of the second-moment average.",
      read_when=_adam)
  adam_epsilon: float = _field(
      1e-8,
      "Adam: added to sqrt(v) before the bias correction (Torch's "
      "placement).",
      read_when=_adam)
  sam_rho: Optional[float] = _field(
      None,  # None: SAM_DEFAULT_RHO of the variant.
      "SAM: neighbourhood radius rho. Unset: 0.05 (SAM), 0.5 "
      "(--sam_adaptive).",
      read_when=_sam)
  sam_adaptive: bool = _field(
      False,
      "SAM: adaptive SAM (ASAM), eps = rho T^2 g / ||T g|| with T = "
      "|w| + --sam_eta.",
      read_when=_sam)
  sam_eta: float = _field(
      0.01,
      "ASAM: eta in T = |w| + eta.",
      read_when=_adaptive_sam)
  sam_perturbation: str = _field(
      "per_replica",
      "SAM under several replicas: per_replica (each replica "
      "ascends along its own gradient, m-sharpness, as Foret et "
      "al.) or synchronized (along the all-reduced gradient).",
      read_when=_sam)
  L: int = _field(
      20,
      "Entropy-SGD: Langevin steps (gradient evaluations) per "
      "update.",
      read_when=_entropy_sgd)
  langevin_lr: float = _field(
      0.1,
      "Entropy-SGD: SGLD step size eta'.",
      read_when=_entropy_sgd)
  noise: float = _field(
      1e-4,
      "Entropy-SGD: thermal noise eps.",
      read_when=_entropy_sgd)
  gamma: float = _field(
      0.03,
      "Entropy-SGD: initial scope gamma0.",
      read_when=_entropy_sgd)
  scoping: float = _field(
      1e-3,
      "Entropy-SGD: gamma1; gamma_t = gamma0 (1 + gamma1)^t.",
      read_when=_entropy_sgd)
  alpha: float = _field(
      0.75,
      "Entropy-SGD: running-mean weight (meaning set by "
      "--conventions).",
      read_when=_entropy_sgd)
  conventions: str = _field(
      "lua_reference",
      "Entropy-SGD: paper, lua_reference or pytorch_reference "
      "(docs/conventions.md).",
      read_when=_entropy_sgd)
  outer_weight_decay: Optional[bool] = _field(
      None,  # None: the conventions' own.
      "Entropy-SGD: add the weight decay to the outer step's "
      "direction too (true) or keep it in the inner loop only "
      "(false). Unset: the --conventions' own (only "
      "pytorch_reference adds it).",
      read_when=_entropy_sgd)
  parle: bool = _field(
      False,
      "Entropy-SGD: Parle mode; each replica runs its own chain and "
      "the replicas average elastically once per outer step.",
      read_when=_entropy_sgd)
  rho: float = _field(
      float("inf"),
      "Parle: coupling rho0 of the replicas to their mean (inf: "
      "exact averaging).",
      read_when=_parle)
  rho_scoping: float = _field(
      1e-3,
      "Parle: rho_t = rho0 (1 + rho_scoping)^t.",
      read_when=_parle)
  seed: int = _field(
      0,
      "Seed of initialisation, data order, augmentation and noise.",
      experiment=False)
  jit: bool = _field(
      False,
      "Compile the per-replica step with XLA.",
      experiment=False, resume_may_change=True)
  noise_kernel: str = _field(
      "auto",  # NOISE_KERNEL_CHOICES; see noise.resolve.
      "Entropy-SGD: which implementation draws the Langevin noise. "
      "auto: the compiled CPU kernel when it loads and applies (no "
      "GPU, no --jit, no TPU), else TensorFlow's ops; on: the "
      "kernel, or stop with one line saying why not; off: "
      "TensorFlow's ops. The two draw the same distribution but "
      "differ at float round-off, so the resolved choice is logged "
      "and recorded in config.json, and a resume that would switch "
      "it is refused. ENTROPY_SGD_NOISE_KERNEL=PATH loads that "
      "library instead of the packaged one.",
      read_when=_entropy_sgd, experiment=False, resume_may_change=True)
  precision: str = _field(
      "float32",  # Or mixed_bfloat16, mixed_float16.
      "float32; mixed_bfloat16 (forward and backward passes in "
      "bfloat16, fast on CPUs with AVX512_BF16, TPUs and recent "
      "GPUs); or mixed_float16 (float16 with dynamic loss scaling, "
      "for GPUs). Parameters, optimizer state (x, mu, momenta), "
      "BatchNorm statistics and the loss stay float32. See "
      "docs/mixed_precision.md.")
  max_steps: Optional[int] = _field(
      None,
      "Stop after this many outer steps in total (then evaluate and "
      "checkpoint); for smoke runs.",
      resume_may_change=True)
  strategy: str = _field(
      "default",
      "default (one device); mirrored (all local GPUs, else "
      "--num_devices logical CPUs); multi_worker "
      "(MultiWorkerMirroredStrategy over the workers in TF_CONFIG, "
      "all GPUs of each, else one CPU each); tpu (TPUStrategy on "
      "--tpu). See docs/scaling_out.md.")
  num_devices: int = _field(
      2,
      "Logical CPU devices for --strategy=mirrored without GPUs.",
      read_when=_mirrored)
  tpu: str = _field(
      "",
      "--strategy=tpu: TPU name or grpc://HOST:8470 address for "
      "TPUClusterResolver; empty: the local TPU (Cloud TPU VM).",
      experiment=False, resume_may_change=True)
  sync_batch_norm: bool = _field(
      False,
      "Synchronised BatchNorm: batch statistics of the global batch "
      "(all replicas) instead of each replica's share.")
  validation_examples: int = _field(
      0,
      "Hold out the last N training images as a clean validation "
      "split.")
  augment: str = _field(
      "flip_crop",
      "Training augmentation: flip_crop (WRN standard), flip_rotate "
      "(TF1 project), flip_crop_rotate or none.")
  preprocess: str = _field(
      "standardize",
      "CIFAR input normalisation: standardize (per-channel mean and "
      "std of the training images) or gcn_zca (global contrast "
      "normalisation, then ZCA whitening fitted on the training "
      "split; the paper's Sec. 5.2).")
  rotation_degrees: float = _field(
      data_lib.DEFAULT_ROTATION_DEGREES,
      "Maximum rotation angle of flip_rotate augmentation.",
      read_when=_rotating)
  recalibrate_bn: bool = _field(
      True,
      "Entropy-SGD: recompute BatchNorm statistics at the anchor "
      "weights before each evaluation.",
      read_when=_entropy_sgd, moves_weights=False)
  recalibration_batches: int = _field(
      20,
      "Batches fed to recompute BatchNorm statistics.",
      read_when=_entropy_sgd, moves_weights=False)
  recalibration_augment: bool = _field(
      True,
      "Entropy-SGD: augment the recalibration batches as the training "
      "batches (--augment; false: un-augmented, like the reference code's "
      "dry feed, whose recipe did not augment).",
      read_when=_recalibrating_augmented, moves_weights=False,
      absent_means=False)
  log_every_steps: int = _field(
      50,
      "Log and summarise every N outer steps.",
      experiment=False, resume_may_change=True)
  steps_per_loop: int = _field(
      1,
      "Outer steps per compiled call (fewer Python round trips on "
      "small models). Logging, the NaN check, evaluation and "
      "checkpoints happen between calls.",
      experiment=False, resume_may_change=True)
  eval_every_steps: Optional[int] = _field(
      None,
      "Also evaluate and checkpoint every N outer steps (besides "
      "every epoch).",
      resume_may_change=True)
  track_flatness_every_steps: Optional[int] = _field(
      None,
      "Every N outer steps, log flatness/lambda_max and "
      "flatness/hessian_trace at x: 10 power and 10 Hutchinson "
      "iterations of the Hessian on 2 fixed training batches "
      "(docs/flatness.md). Unset: off.",
      moves_weights=False, resume_may_change=True)
  keep_checkpoints: int = _field(
      3,
      "Checkpoints kept in the run directory.",
      experiment=False, resume_may_change=True)
  deterministic: bool = _field(
      False,
      "Enable TF op determinism (bit-reproducible, slower).",
      experiment=False, resume_may_change=True)
  allow_config_change: bool = _field(
      False,
      "Resume a run under settings that define another experiment "
      "(e.g. a new --lr); the change is logged and recorded in "
      "config.json with its step. Without it such a resume is "
      "refused.",
      experiment=False, resume_may_change=True)

  @property
  def gradient_evaluations_per_step(self) -> int:
    if self.opt == "sam":
      return optimizers.SAM.gradient_evaluations_per_step
    if self.opt != "entropy_sgd":
      return 1
    # pytorch_reference adds the gradient at x to the L Langevin steps.
    return self.L + int(
        optimizers.PRESETS[self.conventions].needs_anchor_gradient)

  def default_run_name(self) -> str:
    parts = [self.dataset, self.model,
             "asam" if self.opt == "sam" and self.sam_adaptive else self.opt]
    if self.opt == "entropy_sgd":
      parts.append(f"L{self.L}")
    if self.recipe != "reference_code":
      parts.append(self.recipe)
    if self.init is not None and self.init != models.spec(
        self.model).default_init:
      parts.append(f"init-{self.init}")
    parts.append(f"seed{self.seed}")
    if self.precision != "float32":  # Never resumes a run of another one.
      parts.append(self.precision)
    return "_".join(parts)


def complete_record(values) -> dict:
  """A stored config (dict) with each field it lacks that has ABSENT_MEANS
  set to that value: what the code that wrote it did."""
  completed = dict(values)
  for f in dataclasses.fields(TrainConfig):
    if f.name not in completed and ABSENT_MEANS in f.metadata:
      completed[f.name] = f.metadata[ABSENT_MEANS]
  return completed


def unread_fields(values) -> frozenset:
  """The fields a run of these settings (a TrainConfig's dict) never reads:
  they cannot tell two experiments apart, nor a resume from its run."""
  return frozenset(f.name for f in dataclasses.fields(TrainConfig)
                   if not f.metadata[READ_WHEN](values))


# Fields that never tell experiments apart: the seed, where the run and its
# data live, and settings that change neither the trajectory nor the
# measurements beyond float round-off.
NOT_EXPERIMENT_FIELDS = frozenset(
    f.name for f in dataclasses.fields(TrainConfig)
    if not f.metadata[EXPERIMENT])


# Experiment fields that change what a run reports, never its weights: runs
# that differ only in them (and the seed) share their final weights' law.
EVALUATION_ONLY_FIELDS = frozenset(
    f.name for f in dataclasses.fields(TrainConfig)
    if f.metadata[EXPERIMENT] and not f.metadata[MOVES_WEIGHTS])


# Fields a resumed run may change: they only extend the run (its budget,
# its evaluations) or observe it (where it lives, logging, checkpoints kept,
# how it is compiled). A resume that changes any other field would continue
# another experiment, and is refused unless --allow_config_change.
# --noise_kernel only asks; what it resolves to is compared (below).
RESUME_MAY_CHANGE = frozenset(
    f.name for f in dataclasses.fields(TrainConfig)
    if f.metadata[RESUME_MAY_CHANGE_KEY])
# Besides the fields, config.json records what each start resolved on its
# machine: the implementation that draws the Langevin noise
# (`noise.resolve` of --noise_kernel: "kernel", "tensorflow" or "none"),
# compared on resume as a field that may not change (the two drift apart
# at float round-off), and why it was chosen, which is never compared.
NOISE_IMPLEMENTATION = "noise_implementation"
NOISE_IMPLEMENTATION_REASON = "noise_implementation_reason"
FLOAT_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig)
                     if f.type in (float, "float", Optional[float],
                                   "Optional[float]"))

# The neighbourhood radius when --sam_rho is unset: the CIFAR-10 values
# issue 20 gives, SAM rho = 0.05 (Foret et al., ICLR 2021) and ASAM rho = 0.5
# with eta = 0.01 (Kwon et al., ICML 2021); not yet checked against the
# papers' text here.
SAM_DEFAULT_RHO = {False: 0.05, True: 0.5}


def pipeline_config(config: "TrainConfig", **overrides
                    ) -> data_lib.PipelineConfig:
  """The input pipeline `config` trains on; `overrides` replace its fields.

  Every PipelineConfig field TrainConfig also has is taken from it, so a tool
  that re-reads a run's data (//launch:landscape) sees what training saw.
  """
  shared = {f.name for f in dataclasses.fields(data_lib.PipelineConfig)} & {
      f.name for f in dataclasses.fields(TrainConfig)}
  values = {name: getattr(config, name) for name in shared}
  values.update(overrides)
  return data_lib.PipelineConfig(**values)


def sam_rho(config: "TrainConfig") -> float:
  return (SAM_DEFAULT_RHO[config.sam_adaptive] if config.sam_rho is None
          else config.sam_rho)


PRESETS = {
    "sgd": dict(opt="sgd", model="wrn-28-10", epochs=200, batch_size=128,
                lr=0.1, lr_decay_epochs=(60, 120, 160), lr_decay_factor=0.2,
                momentum=0.9, weight_decay=5e-4),
    "nesterov": dict(opt="nesterov", model="wrn-28-10", epochs=200,
                     batch_size=128, lr=0.1,
                     lr_decay_epochs=(60, 120, 160), lr_decay_factor=0.2,
                     momentum=0.9, weight_decay=5e-4),
    "entropy_sgd": dict(opt="entropy_sgd", model="wrn-28-10", epochs=10,
                        batch_size=128, lr=1.0, lr_decay_epochs=(4, 8),
                        lr_decay_factor=0.2, momentum=0.9, weight_decay=5e-4,
                        L=20, langevin_lr=0.1, noise=1e-4, gamma=0.03,
                        scoping=1e-3, alpha=0.75,
                        conventions="lua_reference"),
}
# SAM's base optimizer and schedule are Nesterov's (Foret et al. train WRNs
# with SGD's own schedule); each step costs 2 gradient evaluations.
PRESETS["sam"] = dict(PRESETS["nesterov"], opt="sam")


# ucla-vision/entropy-sgd `train.lua` (commit aac1bc2, the version that also
# tests on the test set) `learning_rate_schedule()` and its optimiser state:
# "SGD" is Nesterov momentum 0.9 (dampening 0) there, L2 from --L2 (default
# 0; the README's CIFAR commands pass --L2 1e-3), batch 128, dropout 0.5.
# Its epochs are 1-based and a regime {a, b, lr} covers epochs a..b, so a
# rate that changes "after epoch e" is our (0-based) boundary e.
_REFERENCE_SGD = dict(batch_size=128, lr=0.1, lr_decay_factor=0.2,
                      momentum=0.9)
_REFERENCE_ENTROPY_SGD = dict(
    batch_size=128, L=20, langevin_lr=0.1, noise=1e-4, gamma=0.03,
    scoping=1e-3, alpha=0.75, momentum=0.9, conventions="lua_reference")
PAPER_MODEL_PRESETS = {
    # MNIST (no augmentation in the reference), SGD: 0.1 for epochs 1-30, x0.2 for 31-60, x0.2 again after;
    # 100 epochs; no weight decay.
    ("mnist", "mnistfc", "sgd"): dict(
        _REFERENCE_SGD, epochs=100, lr_decay_epochs=(30, 60),
        weight_decay=0.0, augment="none"),
    # Entropy-SGD mnistfc: lr 1 for epochs 1-2, 0.1 after; 5 epochs (x L=20
    # = 100 effective epochs); gamma0 = 1e-4, train.lua's default (line 10,
    # `--gamma (default 1e-4)`; the reference README gives no mnistfc
    # command). Before 2026-12-02 this preset had gamma0 = 0.03, which no
    # source gives; docs/results/mnist was run with it.
    ("mnist", "mnistfc", "entropy_sgd"): dict(
        _REFERENCE_ENTROPY_SGD, epochs=5, lr=1.0, lr_decay_epochs=(2,),
        lr_decay_factor=0.1, gamma=1e-4, weight_decay=0.0, augment="none"),
    # Entropy-SGD LeNet: lr 1 for epochs 1-2, 0.1 for 3-7, 0.01 after;
    # gamma0 = 1e-4 from the reference README's LeNet command
    # (`th train.lua -m mnistconv -L 20 --gamma 1e-4 --scoping 1e-3
    # --noise 1e-4`).
    ("mnist", "lenet", "entropy_sgd"): dict(
        _REFERENCE_ENTROPY_SGD, epochs=5, lr=1.0, lr_decay_epochs=(2, 7),
        lr_decay_factor=0.1, gamma=1e-4, weight_decay=0.0, augment="none"),
    # All-CNN-BN, SGD: 0.1, x0.2 after epochs 60, 120 and 180; 200 epochs;
    # --L2 1e-3 (README command).
    ("cifar", "allcnn", "sgd"): dict(
        _REFERENCE_SGD, epochs=200, lr_decay_epochs=(60, 120, 180),
        weight_decay=1e-3),
    # All-CNN-BN, Entropy-SGD: lr 1 for epochs 1-3, 0.2 for 4-6, 0.04 after;
    # 10 epochs; gamma0 = 0.03, --L2 1e-3 (README command).
    ("cifar", "allcnn", "entropy_sgd"): dict(
        _REFERENCE_ENTROPY_SGD, epochs=10, lr=1.0, lr_decay_epochs=(3, 6),
        lr_decay_factor=0.2, weight_decay=1e-3),
}
PAPER_MODEL_PRESETS[("mnist", "lenet", "sgd")] = PAPER_MODEL_PRESETS[
    ("mnist", "mnistfc", "sgd")]

# Adam where a recipe has no entry of its own: the paper's MNIST baseline
# (Sec. 5.1: lr 1e-3, x0.2 every 30 epochs, 100 epochs) with Torch
# `optim.adam`'s beta1, beta2 and epsilon (the TrainConfig defaults).
ADAM_PRESET = dict(opt="adam", epochs=100, batch_size=128, lr=1e-3,
                   lr_decay_epochs=(30, 60, 90), lr_decay_factor=0.2,
                   weight_decay=0.0)


def _merge(*recipes, **values) -> dict:
  """The recipes' values, later ones winning, then `values`."""
  merged = {}
  for recipe in recipes:
    merged.update(recipe)
  merged.update(values)
  return merged


# --recipe=paper. "Sec." is Sec. 5 of the ICLR 2017 text
# (pratikac/explore-hessian doc/chaudhari.choromanska.ea.iclr17.tex at
# 4eed403, "uploaded to arxiv"); "Lua" is that repository's dnn/ code of the
# runs, where the text is silent: train.lua at 11bdc51 ("mnistfc works, long
# job") and f1de31f ("started long run on mnistconv"), models.lua at 9564f29,
# entropyoptim.lua at 4eed403, ploterrors.py at 4eed403. Values the text
# gives win over the code: the code's defaults at those commits had noise
# 1e-4 (mnistfc) and 3e-4 (LeNet) where Sec. 5.1 says 1e-3.
_PAPER_COMMON = dict(
    batch_size=(128, "train.lua --batch_size default 128"),
    init=("torch", "models.lua: Torch's default reset() throughout"),
    augment=("none", "Sec. 5.1 none; Sec. 5.2 'without data augmentation'"),
    momentum=(0.9, "Sec. 5.1/5.2 Nesterov 0.9 (train.lua optim_state)"))
_PAPER_MNIST = _merge(
    _PAPER_COMMON,
    weight_decay=(0.0, "train.lua --L2 default 0 at 11bdc51 and f1de31f"))
_PAPER_ENTROPY_SGD = dict(
    L=(20, "Sec. 5.1/5.2 'L = 20'"),
    langevin_lr=(0.1, "Sec. 5.1/5.2 'eta' = 0.1'"),
    scoping=(1e-3, "Sec. 5.1/5.2 'a factor of 1.001 after each update'"),
    alpha=(0.75, "entropyoptim.lua lparams beta1 = 0.75"),
    lr=(1.0, "Sec. 5.1/5.2 'eta = 1'"),
    conventions=("lua_reference", "the runs' optimizer, entropyoptim.lua"))
_ADAM_SOURCE = "Sec. 5.1 Adam: lr 1e-3 x0.2 every 30 epochs, 100 epochs"
_PAPER_ADAM = {key: (value, "Sec. 5.1: the baseline is Adam" if key == "opt"
                     else _ADAM_SOURCE)
               for key, value in ADAM_PRESET.items()
               if key not in ("batch_size", "weight_decay")}
_MNISTFC_SCHEDULE = ("ploterrors.py plot_mnistfc loads 10 epochs of the "
                     "January runs and marks 1.37% at effective epoch 120 "
                     "(Table 1), past the text's '5 epochs'; train.lua "
                     "11bdc51: max_epochs 10, regime 1 / 0.1 after epoch 2")
_LENET_SCHEDULE = ("Sec. 5.1: 5 epochs (100 effective; train.lua f1de31f "
                   "max_epochs 5), the regime of mnistfc's at f1de31f")
_SEC_5_1_ESGD = "Sec. 5.1 (Entropy-SGD on MNIST)"
_SEC_5_2 = "Sec. 5.2 (All-CNN-BN on CIFAR-10)"
_ALLCNN_WEIGHT_DECAY = ("Springenberg et al.: 1e-3; train.lua --L2 default "
                        "1e-3 at 4eed403")
# Each value with its source: (value, source).
_PAPER_RECIPE_SOURCED = {
    ("mnist", "mnistfc", "adam"): _merge(
        _PAPER_ADAM, _PAPER_MNIST,
        dropout=(0.5, "Sec. 5.1 'dropout of 0.5' after each layer")),
    ("mnist", "lenet", "adam"): _merge(
        _PAPER_ADAM, _PAPER_MNIST,
        dropout=(0.5, "Sec. 5.1 'dropout of 0.5' after each layer")),
    ("mnist", "mnistfc", "entropy_sgd"): _merge(
        _PAPER_MNIST, _PAPER_ENTROPY_SGD,
        epochs=(10, _MNISTFC_SCHEDULE), lr_decay_epochs=((2, 7),
                                                          _MNISTFC_SCHEDULE),
        lr_decay_factor=(0.1, "Sec. 5.1 'eta x0.1 after the second epoch'"),
        dropout=(0.15, _SEC_5_1_ESGD), noise=(1e-3, _SEC_5_1_ESGD),
        gamma=(1e-4, _SEC_5_1_ESGD)),
    ("mnist", "lenet", "entropy_sgd"): _merge(
        _PAPER_MNIST, _PAPER_ENTROPY_SGD,
        epochs=(5, _LENET_SCHEDULE), lr_decay_epochs=((2, 7), _LENET_SCHEDULE),
        lr_decay_factor=(0.1, "Sec. 5.1 'eta x0.1 after the second epoch'"),
        dropout=(0.25, _SEC_5_1_ESGD), noise=(1e-3, _SEC_5_1_ESGD),
        gamma=(1e-4, _SEC_5_1_ESGD)),
    ("cifar", "allcnn", "nesterov"): _merge(
        _PAPER_COMMON, opt=("nesterov", _SEC_5_2),
        preprocess=("gcn_zca", "Sec. 5.2 'global contrast normalization and "
                    "ZCA whitening'"),
        epochs=(200, _SEC_5_2), lr=(0.1, _SEC_5_2),
        lr_decay_epochs=((60, 120, 180), _SEC_5_2 + ": x0.2 every 60 epochs"),
        lr_decay_factor=(0.2, _SEC_5_2),
        weight_decay=(1e-3, _ALLCNN_WEIGHT_DECAY),
        dropout=(0.5, "Sec. 5.2 'the original dropout'")),
    ("cifar", "allcnn", "entropy_sgd"): _merge(
        _PAPER_COMMON, _PAPER_ENTROPY_SGD,
        preprocess=("gcn_zca", "Sec. 5.2 'global contrast normalization and "
                    "ZCA whitening'"),
        epochs=(10, _SEC_5_2 + ": L = 20 for 10 epochs"),
        lr_decay_epochs=((4, 8), _SEC_5_2 + ": eta x0.2 every 4 epochs"),
        lr_decay_factor=(0.2, _SEC_5_2),
        weight_decay=(1e-3, _ALLCNN_WEIGHT_DECAY),
        dropout=(0.5, "Sec. 5.2 'the original dropout'"),
        noise=(1e-4, _SEC_5_2), gamma=(0.03, _SEC_5_2)),
}
PAPER_RECIPE = {key: {name: value for name, (value, _) in recipe.items()}
                for key, recipe in _PAPER_RECIPE_SOURCED.items()}
PAPER_RECIPE_SOURCES = {
    key: {name: source for name, (_, source) in recipe.items()}
    for key, recipe in _PAPER_RECIPE_SOURCED.items()}


def describe_paper_recipe(dataset: str) -> str:
  """`--recipe=paper` on `dataset`, one value per line with its source."""
  lines = []
  for (group, family, opt), values in PAPER_RECIPE.items():
    if group != _dataset_group(dataset):
      continue
    lines.append(f"  --recipe=paper --model={family} --opt={opt}:")
    sources = PAPER_RECIPE_SOURCES[(group, family, opt)]
    for name, value in values.items():
      lines.append(f"      --{name}={value}  ({sources[name]})")
  return "\n".join(lines)


def _dataset_group(dataset: str) -> str:
  return "mnist" if dataset == "mnist" else "cifar"


def _model_family(model: str) -> str:
  try:
    return models.model_family(model)
  except ValueError as e:  # Messages name the flag.
    message = str(e) if str(e).startswith("--model") else f"--model={model}: {e}"
    raise ConfigError(message) from None


def preset(dataset: str, model: str, opt: str,
           recipe: str = "reference_code") -> dict:
  """The recipe for (dataset, model, opt): every field it sets.

  `recipe="reference_code"`: the paper's nets take the reference code's
  recipes (`PAPER_MODEL_PRESETS`); "nesterov" is their "sgd" with Nesterov
  momentum and "sgd" uses heavy-ball momentum (the reference's SGD is
  Nesterov). Wide ResNets take `PRESETS` on any dataset; Adam takes
  `ADAM_PRESET`. `recipe="paper"`: `PAPER_RECIPE`, which holds only what
  the paper ran; anything else is a ConfigError.
  """
  if opt not in OPTIMIZERS:
    raise ConfigError(f"--opt={opt!r} is unknown; choose one of "
                      f"{', '.join(OPTIMIZERS)}.")
  if recipe not in RECIPES:
    raise ConfigError(f"--recipe={recipe!r} is unknown; choose one of "
                      f"{', '.join(RECIPES)}.")
  family = _model_family(model)
  if recipe == "paper":
    key = (_dataset_group(dataset), family, opt)
    if key not in PAPER_RECIPE:
      ran = sorted({o for (d, f, o) in PAPER_RECIPE if key[:2] == (d, f)})
      ran = (f"it ran --opt={'/'.join(ran)} there" if ran else
             "it never trained that model there")
      raise ConfigError(
          f"--recipe=paper: the paper ran no --opt={opt} with "
          f"--model={model} on {dataset} ({ran}); use "
          f"--recipe=reference_code.")
    return dict(PAPER_RECIPE[key], opt=opt, model=model, recipe=recipe)
  if opt == "adam":
    return dict(ADAM_PRESET, model=model)
  if family == "wrn":
    return dict(PRESETS[opt], model=model)
  base_opt = "entropy_sgd" if opt == "entropy_sgd" else "sgd"  # SAM: SGD's.
  key = (_dataset_group(dataset), family, base_opt)
  if key not in PAPER_MODEL_PRESETS:  # A model on a dataset it doesn't fit.
    return dict(PRESETS[opt], model=model)
  return dict(PAPER_MODEL_PRESETS[key], opt=opt, model=model)


def from_preset(opt: str, dataset: str = "cifar10",
                model: Optional[str] = None, recipe: str = "reference_code",
                **overrides) -> TrainConfig:
  """The preset of (dataset, model, opt, recipe) with `overrides`, validated.

  `model` None takes the dataset's default (`DEFAULT_MODELS`, or
  `PAPER_DEFAULT_MODELS` for the paper recipe).
  """
  if dataset not in DATASETS:
    raise ConfigError(f"--dataset={dataset!r} is unknown; choose one of "
                      f"{DATASETS}.")
  defaults = PAPER_DEFAULT_MODELS if recipe == "paper" else DEFAULT_MODELS
  model = model or defaults[dataset]
  config = TrainConfig(**{**preset(dataset, model, opt, recipe), **overrides,
                          "dataset": dataset, "recipe": recipe})
  validate(config)
  return config


def describe_presets(dataset: str) -> str:
  """The presets a launcher of `dataset` offers, one line each."""
  lines = []
  shown = ("epochs", "lr", "lr_decay_epochs", "lr_decay_factor", "momentum",
           "weight_decay", "L", "gamma", "conventions")
  for name in models.models_for(dataset):
    model = "wrn-DEPTH-WIDTH" if name.startswith("wrn") else name
    for opt in OPTIMIZERS:
      recipe = preset(dataset, name, opt)
      values = ", ".join(f"{k}={recipe[k]}" for k in shown if k in recipe
                         and (k not in ("L", "gamma", "conventions") or
                              opt == "entropy_sgd"))
      lines.append(f"  --model={model} --opt={opt}: {values}")
  return "\n".join(lines)


def learning_rate_at(config: TrainConfig, epoch: float) -> float:
  """Step schedule: lr * factor**(number of decay epochs <= epoch).

  `epoch` counts outer epochs and may be fractional (outer step / steps per
  epoch), so decays may fall inside an epoch, e.g. `--lr_decay_epochs=0.4,0.8`
  for a one-epoch Entropy-SGD run.
  """
  num_decays = sum(1 for boundary in config.lr_decay_epochs
                   if epoch >= boundary)
  return config.lr * config.lr_decay_factor**num_decays


def _require(condition: bool, message: str):
  if not condition:
    raise ConfigError(message)


def validate(config: TrainConfig):
  """Raises ConfigError naming the first invalid setting."""
  c = config
  _require(c.dataset in DATASETS,
           f"--dataset={c.dataset!r} is unknown; choose one of {DATASETS}.")
  _require(c.opt in OPTIMIZERS,
           f"--opt={c.opt!r} is unknown; choose one of {OPTIMIZERS}.")
  _require(c.recipe in RECIPES,
           f"--recipe={c.recipe!r} is unknown; choose one of {RECIPES}.")
  _require(c.init is None or c.init in models.INITIALISATIONS,
           f"--init={c.init!r} is unknown; choose one of "
           f"{models.INITIALISATIONS}.")
  _require(c.init in (None, "he") or _model_family(c.model) != "wrn",
           f"--init={c.init} is implemented for the paper's nets, not "
           f"--model={c.model}; drop it.")
  _require(c.preprocess in PREPROCESSING,
           f"--preprocess={c.preprocess!r} is unknown; choose one of "
           f"{PREPROCESSING}.")
  _require(c.preprocess == "standardize" or c.dataset != "mnist",
           f"--preprocess={c.preprocess} is for CIFAR; drop it for MNIST.")
  _require(0 <= c.adam_beta1 < 1 and 0 <= c.adam_beta2 < 1,
           f"--adam_beta1 and --adam_beta2 must be in [0, 1); got "
           f"{c.adam_beta1}, {c.adam_beta2}.")
  _require(c.adam_epsilon > 0, f"--adam_epsilon must be > 0; got "
           f"{c.adam_epsilon}.")
  _require(c.sam_rho is None or c.sam_rho > 0,
           f"--sam_rho must be > 0; got {c.sam_rho}.")
  _require(c.sam_eta >= 0, f"--sam_eta must be >= 0; got {c.sam_eta}.")
  _require(c.outer_weight_decay in (None, True, False),
           f"--outer_weight_decay must be true or false; got "
           f"{c.outer_weight_decay!r}.")
  _require(c.sam_perturbation in optimizers.SAM_PERTURBATIONS,
           f"--sam_perturbation={c.sam_perturbation!r} is unknown; choose "
           f"one of {optimizers.SAM_PERTURBATIONS}.")
  _require(c.opt != "sam" or c.precision != "mixed_float16",
           "--opt=sam does not support --precision=mixed_float16 yet; use "
           "float32 or mixed_bfloat16.")
  wrn = wide_resnet.model_name_parts(c.model)
  if wrn is not None:
    depth, width = wrn
    _require(depth >= 10 and (depth - 4) % 6 == 0,
             f"--model={c.model}: WRN depth must be 6n+4 (10, 16, 22, 28, "
             f"...); got {depth}.")
    _require(width >= 1, f"--model={c.model}: width must be >= 1.")
  _model_family(c.model)
  try:
    models.check_fits(c.model, c.dataset)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _require(not c.sync_batch_norm or _model_family(c.model) == "wrn",
           f"--sync_batch_norm is implemented for the Wide ResNets, not "
           f"--model={c.model}; drop it.")
  _require(c.dropout is None or 0.0 <= c.dropout < 1.0,
           f"--dropout must be in [0, 1); got {c.dropout}.")
  _require(c.epochs >= 1, f"--epochs must be >= 1; got {c.epochs}.")
  _require(c.batch_size >= 1, f"--batch_size must be >= 1; got "
           f"{c.batch_size}.")
  _require(c.lr > 0, f"--lr must be > 0; got {c.lr}.")
  _require(0 < c.lr_decay_factor <= 1,
           f"--lr_decay_factor must be in (0, 1]; got {c.lr_decay_factor}.")
  _require(all(e > 0 for e in c.lr_decay_epochs),
           f"--lr_decay_epochs must be positive epochs; got "
           f"{list(c.lr_decay_epochs)}.")
  _require(0 <= c.momentum < 1, f"--momentum must be in [0, 1); got "
           f"{c.momentum}.")
  _require(c.weight_decay >= 0, f"--weight_decay must be >= 0; got "
           f"{c.weight_decay}.")
  _require(c.L >= 1, f"--L must be >= 1 (Langevin steps); got {c.L}.")
  _require(c.langevin_lr > 0, f"--langevin_lr must be > 0; got "
           f"{c.langevin_lr}.")
  _require(c.noise >= 0, f"--noise must be >= 0; got {c.noise}.")
  _require(c.gamma > 0, f"--gamma must be > 0; got {c.gamma}.")
  _require(c.scoping >= 0, f"--scoping must be >= 0; got {c.scoping}.")
  _require(0 < c.alpha <= 1, f"--alpha must be in (0, 1]; got {c.alpha}.")
  _require(c.conventions in optimizers.PRESETS,
           f"--conventions={c.conventions!r} is unknown; choose one of "
           f"{sorted(optimizers.PRESETS)}.")
  _require(not c.parle or c.opt == "entropy_sgd",
           "--parle needs --opt=entropy_sgd.")
  _require(c.rho > 0, f"--rho must be > 0 (inf: exact averaging); got "
           f"{c.rho}.")
  _require(c.rho_scoping >= 0, f"--rho_scoping must be >= 0; got "
           f"{c.rho_scoping}.")
  _require(c.noise_kernel in NOISE_KERNEL_CHOICES,
           f"--noise_kernel={c.noise_kernel!r} is unknown; choose one of "
           f"{', '.join(NOISE_KERNEL_CHOICES)}.")
  _require(c.precision in precision.PRECISIONS,
           f"--precision={c.precision!r} is unknown; choose one of "
           f"{', '.join(precision.PRECISIONS)}.")
  _require(c.max_steps is None or c.max_steps >= 1,
           f"--max_steps must be >= 1; got {c.max_steps}.")
  _require(c.strategy in STRATEGIES,
           f"--strategy={c.strategy!r} is unknown; choose one of "
           f"{STRATEGIES}.")
  _require(c.num_devices >= 1, f"--num_devices must be >= 1; got "
           f"{c.num_devices}.")
  _require(not c.tpu or c.strategy == "tpu",
           f"--tpu={c.tpu!r} needs --strategy=tpu; got --strategy="
           f"{c.strategy}.")
  _require(c.validation_examples >= 0,
           f"--validation_examples must be >= 0; got "
           f"{c.validation_examples}.")
  _require(c.augment in AUGMENTATIONS,
           f"--augment={c.augment!r} is unknown; choose one of "
           f"{AUGMENTATIONS}.")
  _require(0 <= c.rotation_degrees <= 180,
           f"--rotation_degrees must be in [0, 180]; got "
           f"{c.rotation_degrees}.")
  _require(c.recalibration_batches >= 1,
           f"--recalibration_batches must be >= 1; got "
           f"{c.recalibration_batches}.")
  _require(c.log_every_steps >= 1, f"--log_every_steps must be >= 1; got "
           f"{c.log_every_steps}.")
  _require(c.steps_per_loop >= 1, f"--steps_per_loop must be >= 1; got "
           f"{c.steps_per_loop}.")
  _require(c.eval_every_steps is None or c.eval_every_steps >= 1,
           f"--eval_every_steps must be >= 1; got {c.eval_every_steps}.")
  _require(c.track_flatness_every_steps is None or
           c.track_flatness_every_steps >= 1,
           f"--track_flatness_every_steps must be >= 1; got "
           f"{c.track_flatness_every_steps}.")
  _require(c.keep_checkpoints >= 1, f"--keep_checkpoints must be >= 1; got "
           f"{c.keep_checkpoints}.")
