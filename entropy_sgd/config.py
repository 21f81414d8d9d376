"""Training configuration, presets and validation.

`TrainConfig` holds every setting of a run. `PRESETS` are the published
recipes, one per optimizer, like the TF1 project's `config_train`; every
field can be overridden (the launchers map each flag to a field).

Sources of the presets:
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
import re
from typing import Optional, Tuple

from entropy_sgd import optimizers

OPTIMIZERS = ("sgd", "nesterov", "entropy_sgd")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
AUGMENTATIONS = ("flip_crop", "flip_rotate", "flip_crop_rotate", "none")
DATASETS = ("cifar10", "cifar100")


class ConfigError(ValueError):
  """An invalid setting; the message names it and says how to fix it."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run needs. Epoch counts are outer epochs."""
  dataset: str = "cifar10"
  data_dir: Optional[str] = None
  log_dir: str = "runs"
  run_name: Optional[str] = None
  model: str = "wrn-28-10"
  dropout: float = 0.0
  opt: str = "nesterov"
  epochs: int = 200
  batch_size: int = 128
  lr: float = 0.1
  lr_decay_epochs: Tuple[int, ...] = (60, 120, 160)
  lr_decay_factor: float = 0.2
  momentum: float = 0.9
  weight_decay: float = 5e-4
  L: int = 20
  langevin_lr: float = 0.1
  noise: float = 1e-4
  gamma: float = 0.03
  scoping: float = 1e-3
  alpha: float = 0.75
  conventions: str = "lua_reference"
  parle: bool = False
  rho: float = float("inf")
  rho_scoping: float = 1e-3
  seed: int = 0
  jit: bool = False
  max_steps: Optional[int] = None
  strategy: str = "default"
  num_devices: int = 2
  tpu: str = ""
  sync_batch_norm: bool = False
  validation_examples: int = 0
  augment: str = "flip_crop"
  rotation_degrees: float = 15.0
  recalibrate_bn: bool = True
  recalibration_batches: int = 20
  log_every_steps: int = 50
  eval_every_steps: Optional[int] = None
  keep_checkpoints: int = 3
  deterministic: bool = False

  @property
  def gradient_evaluations_per_step(self) -> int:
    return self.L if self.opt == "entropy_sgd" else 1

  def default_run_name(self) -> str:
    parts = [self.dataset, self.model, self.opt]
    if self.opt == "entropy_sgd":
      parts.append(f"L{self.L}")
    parts.append(f"seed{self.seed}")
    return "_".join(parts)


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


def from_preset(opt: str, **overrides) -> TrainConfig:
  """The preset of `opt` with `overrides` applied, validated."""
  if opt not in PRESETS:
    raise ConfigError(f"--opt={opt!r} is unknown; choose one of "
                      f"{', '.join(OPTIMIZERS)}.")
  config = TrainConfig(**{**PRESETS[opt], **overrides})
  validate(config)
  return config


def learning_rate_at(config: TrainConfig, epoch: int) -> float:
  """Step schedule: lr * factor**(number of decay epochs <= epoch)."""
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
  match = re.fullmatch(r"wrn-(\d+)-(\d+)", c.model.lower())
  _require(match is not None,
           f"--model={c.model!r} is unknown; use wrn-DEPTH-WIDTH, "
           f"e.g. wrn-28-10 or wrn-16-1.")
  depth, width = int(match.group(1)), int(match.group(2))
  _require(depth >= 10 and (depth - 4) % 6 == 0,
           f"--model={c.model}: WRN depth must be 6n+4 (10, 16, 22, 28, ...);"
           f" got {depth}.")
  _require(width >= 1, f"--model={c.model}: width must be >= 1.")
  _require(0.0 <= c.dropout < 1.0, f"--dropout must be in [0, 1); got "
           f"{c.dropout}.")
  _require(c.epochs >= 1, f"--epochs must be >= 1; got {c.epochs}.")
  _require(c.batch_size >= 1, f"--batch_size must be >= 1; got "
           f"{c.batch_size}.")
  _require(c.lr > 0, f"--lr must be > 0; got {c.lr}.")
  _require(0 < c.lr_decay_factor <= 1,
           f"--lr_decay_factor must be in (0, 1]; got {c.lr_decay_factor}.")
  _require(all(e >= 1 for e in c.lr_decay_epochs),
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
  _require(c.eval_every_steps is None or c.eval_every_steps >= 1,
           f"--eval_every_steps must be >= 1; got {c.eval_every_steps}.")
  _require(c.keep_checkpoints >= 1, f"--keep_checkpoints must be >= 1; got "
           f"{c.keep_checkpoints}.")
