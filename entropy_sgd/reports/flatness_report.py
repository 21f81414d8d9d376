"""Flatness against generalisation, over many measured runs.

Input: one directory per measured run, as the measuring commands of
docs/flatness.md write them:

    RUN/config.json, RUN/summary.json      copied from the run directory
    RUN/flatness/landscape.json            //launch:landscape on 10 batches
    RUN/train/landscape.json               //launch:landscape --batches=0
                                           --measures= (the whole training set)

Output (`write_report`): flatness.csv (one row per run), flatness.md and
one scatter plot per measure. The generalisation gap is held-out error
minus training error, in percentage points, both at the final weights. The
held-out error is the clean validation split's when the run held one out
(CIFAR-10's local test file is partly JPEG-restored), else the test
split's; it is taken from RUN/train/landscape.json, at the BatchNorm
statistics of the training error, where that holds it (//launch:landscape
since 2026-12-03), else from the training loop's summary.json. For each
measure:

* per experiment (runs whose weights' settings differ only in the seed:
  evaluation-only settings are pooled, the budget in effective epochs tells
  experiments apart, and look-alikes are labelled by the settings in which
  they differ, as in the results tables): mean ± std over seeds;
* per (dataset, model, recipe, init, budget): Entropy-SGD minus its
  baseline, with the Welch standard error of the difference (where the
  recipe gives the optimizers different budgets, as the paper's does,
  against the recipe's baselines at theirs);
* per dataset, over all its runs: Kendall's tau-b between the measure and the
  gap, with a percentile bootstrap 95% interval over runs (Jiang et al. 2020
  rank measures this way; Dziugaite et al. 2020 on why a single pair says
  little).
"""

import csv
import dataclasses
import math
import os
from typing import Dict, List, Sequence, Tuple

from matplotlib.figure import Figure  # No pyplot: no global backend.
import numpy as np

from entropy_sgd.reports import results as results_lib
from entropy_sgd.train import config as config_lib
from entropy_sgd.train import run_dir as run_dir_lib
from entropy_sgd.workloads import models as models_lib

# (column, landscape.json key or a function of it, what it is).
MEASURES = (
    ("lambda_max", lambda r: r["hessian_top_eigenvalues"][0],
     "Hessian's largest eigenvalue (scale-dependent)"),
    ("hessian_trace", lambda r: r["hessian_trace"],
     "Hessian trace, Hutchinson (scale-dependent)"),
    ("epsilon_sharpness", lambda r: r["epsilon_sharpness"],
     "Keskar et al. epsilon-sharpness, % (box epsilon (|w| + 1))"),
    ("adaptive_sharpness_worst", lambda r: r["adaptive_sharpness_worst"],
     "worst-case adaptive sharpness (Andriushchenko et al. 2023)"),
    ("adaptive_sharpness_average", lambda r: r["adaptive_sharpness_average"],
     "average adaptive sharpness (Andriushchenko et al. 2023)"),
    ("pac_bayes_flatness", lambda r: r["pac_bayes_flatness"],
     "magnitude-aware PAC-Bayes 1/sigma'^2 (Jiang et al. 2020)"),
)
BOOTSTRAP_SAMPLES = 2000


class ReportError(ValueError):
  """A directory is not a measured run; the message says what is missing."""


@dataclasses.dataclass
class MeasuredRun:
  path: str
  dataset: str
  model: str
  recipe: str
  init: str  # The model's own when unset.
  budget: int  # Effective epochs, rounded.
  optimizer: str
  seed: int
  test_error: float  # %
  heldout_split: str  # "validation" when the run held one out, else "test".
  heldout_error: float  # %
  heldout_source: str  # "landscape" (train/landscape.json) or "summary".
  train_error: float  # %
  recalibration: str  # BatchNorm statistics of the training error's pass.
  measures: Dict[str, float]
  # The settings that move the weights, but the seed and the budget's.
  settings: Dict = dataclasses.field(default_factory=dict)
  variant: str = ""  # Set by `label_variants`.

  @property
  def gap(self) -> float:
    return self.heldout_error - self.train_error

  @property
  def look_alike(self) -> Tuple[str, str, str, str, int, str]:
    return (self.dataset, self.model, self.recipe, self.init, self.budget,
            self.optimizer)

  @property
  def label(self) -> str:
    """The optimizer and, among look-alikes, what tells this one apart."""
    return (f"{self.optimizer}, {self.variant}" if self.variant else
            self.optimizer)

  @property
  def experiment(self) -> Tuple[str, str, str, str, int, str]:
    return self.look_alike[:-1] + (self.label,)


def _weights_settings(config: Dict) -> Dict:
  ignored = (config_lib.EVALUATION_ONLY_FIELDS |
             set(results_lib.BUDGET_FIELDS))
  return {k: v for k, v in results_lib.experiment_settings(
      results_lib.config_from_record(config)).items() if k not in ignored}


def _settings_key(settings: Dict) -> Tuple:
  return tuple(sorted((k, repr(v)) for k, v in settings.items()))


def label_variants(runs: Sequence[MeasuredRun]) -> None:
  """Sets each run's `variant`: among runs of one look-alike key whose
  settings differ beyond the seed, the settings in which they differ."""
  by_look_alike: Dict[Tuple, Dict[Tuple, Dict]] = {}
  for r in runs:
    by_look_alike.setdefault(r.look_alike, {}).setdefault(
        _settings_key(r.settings), r.settings)
  labels = {}
  for look_alike, distinct in by_look_alike.items():
    for key, label in zip(distinct, results_lib.distinguishing_labels(
        list(distinct.values()))):
      labels[look_alike, key] = label
  for r in runs:
    r.variant = labels[r.look_alike, _settings_key(r.settings)]


def _read(path: str) -> Dict:
  try:
    return run_dir_lib.read_json(path)
  except (OSError, ValueError) as e:
    raise ReportError(f"{path}: cannot read it ({e}); measure the run with "
                      f"the commands of docs/flatness.md first.") from None


def load(path: str) -> MeasuredRun:
  config = _read(os.path.join(path, run_dir_lib.CONFIG_FILE))
  summary = _read(os.path.join(path, run_dir_lib.SUMMARY_FILE))
  flatness = _read(os.path.join(path, "flatness", "landscape.json"))
  train = _read(os.path.join(path, "train", "landscape.json"))
  measures = {}
  for name, read, _ in MEASURES:
    try:
      measures[name] = float(read(flatness))
    except (KeyError, IndexError, TypeError):
      measures[name] = math.nan
  test_error = 100.0 * (1.0 - float(summary["final_test_accuracy"]))
  validation = summary.get("final_validation_accuracy")
  heldout_split = "test" if validation is None else "validation"
  if train.get("heldout_split") == heldout_split:
    heldout_source = "landscape"
    heldout_error = 100.0 * (1.0 - float(train["heldout_accuracy"]))
  else:
    heldout_source = "summary"
    heldout_error = 100.0 * (1.0 - float(
        summary["final_test_accuracy"] if validation is None else validation))
  return MeasuredRun(
      path=path, dataset=config["dataset"], model=config["model"],
      recipe=config.get("recipe", "reference_code"),
      init=config.get("init") or models_lib.spec(config["model"]).default_init,
      budget=int(round(float(summary["effective_epochs"]))),
      optimizer=results_lib.optimizer_label(config),
      seed=int(config["seed"]),
      test_error=test_error,
      heldout_split=heldout_split, heldout_error=heldout_error,
      heldout_source=heldout_source,
      # float32 sums of hits can exceed 1 by rounding: no negative error.
      train_error=max(0.0, 100.0 * (1.0 - float(train["accuracy"]))),
      recalibration=train.get("batch_norm_recalibration", "un-augmented"),
      measures=measures, settings=_weights_settings(config))


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
  """Kendall's tau-b (ties counted as in scipy.stats.kendalltau)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  concordant = discordant = ties_x = ties_y = 0
  for i in range(len(x)):
    dx, dy = np.sign(x[i + 1:] - x[i]), np.sign(y[i + 1:] - y[i])
    concordant += int(np.sum(dx * dy > 0))
    discordant += int(np.sum(dx * dy < 0))
    ties_x += int(np.sum((dx == 0) & (dy != 0)))
    ties_y += int(np.sum((dy == 0) & (dx != 0)))
  denominator = math.sqrt((concordant + discordant + ties_x) *
                          (concordant + discordant + ties_y))
  return (concordant - discordant) / denominator if denominator else math.nan


def bootstrap_interval(x, y, samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = 0) -> Tuple[float, float]:
  """95% percentile interval of tau-b over runs resampled with replacement."""
  x, y = np.asarray(x), np.asarray(y)
  rng = np.random.default_rng(seed)
  taus = []
  for _ in range(samples):
    index = rng.integers(len(x), size=len(x))
    tau = kendall_tau(x[index], y[index])
    if math.isfinite(tau):
      taus.append(tau)
  if not taus:
    return math.nan, math.nan
  return float(np.percentile(taus, 2.5)), float(np.percentile(taus, 97.5))


def _mean_std(values):
  values = [v for v in values if math.isfinite(v)]
  if not values:
    return math.nan, math.nan, 0
  std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
  return float(np.mean(values)), std, len(values)


def _fmt(value, digits=4):
  return "n/a" if not math.isfinite(value) else f"{value:.{digits}g}"


def write_report(paths: Sequence[str], output_dir: str) -> List[str]:
  """Writes flatness.csv, flatness.md and the scatter plots; their paths."""
  runs = [load(p) for p in paths]
  if not runs:
    raise ReportError("no measured runs given.")
  label_variants(runs)
  runs.sort(key=lambda r: (r.experiment, r.seed))
  os.makedirs(output_dir, exist_ok=True)
  written = [os.path.join(output_dir, "flatness.csv")]
  with open(written[0], "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["dataset", "model", "recipe", "init", "budget",
                     "optimizer", "seed", "test_error", "heldout_split",
                     "heldout_error", "heldout_source", "train_error", "gap",
                     "batch_norm_recalibration"] +
                    [name for name, _, _ in MEASURES])
    for r in runs:
      writer.writerow([r.dataset, r.model, r.recipe, r.init, r.budget,
                       r.label, r.seed, r.test_error, r.heldout_split,
                       r.heldout_error, r.heldout_source, r.train_error, r.gap,
                       r.recalibration] +
                      [r.measures[name] for name, _, _ in MEASURES])
  lines = ["# Flatness against generalisation", "",
           "Per run: `flatness.csv`. Errors in %, gap = held-out error − "
           "training error (whole training set), at the final weights; "
           "held out: " + _describe(runs, "heldout_split") + " split, "
           "its error from " + _describe(runs, "heldout_source") + "; "
           "BatchNorm recalibrated on " + _describe(runs, "recalibration") +
           " training batches. Budget in effective epochs. Measures on 10 "
           "training batches, BatchNorm in inference mode "
           "(`docs/flatness.md`).", "", "## Per experiment (mean ± std over "
           "seeds)", "",
           "| dataset | model | recipe | init | budget | optimizer | seeds | "
           "gap | " + " | ".join(name for name, _, _ in MEASURES) + " |",
           "|" + "---|" * (8 + len(MEASURES))]
  experiments: Dict[Tuple, List[MeasuredRun]] = {}
  for r in runs:
    experiments.setdefault(r.experiment, []).append(r)
  for key, members in experiments.items():
    gap = _mean_std([m.gap for m in members])
    cells = [f"{_fmt(gap[0], 3)} ± {_fmt(gap[1], 2)}"]
    for name, _, _ in MEASURES:
      mean, std, _ = _mean_std([m.measures[name] for m in members])
      cells.append(f"{_fmt(mean)} ± {_fmt(std, 2)}")
    lines.append("| " + " | ".join([str(k) for k in key] +
                                   [str(len(members))] + cells)
                 + " |")
  lines += ["", "## Entropy-SGD minus its baseline (difference of means ± "
            "Welch standard error; n/a with one seed on a side)", ""]
  lines.append("| dataset | model | recipe | init | budget | baseline | " +
               " | ".join(name for name, _, _ in MEASURES) + " |")
  lines.append("|" + "---|" * (6 + len(MEASURES)))
  for key, members in experiments.items():
    if not members[0].optimizer.startswith("entropy_sgd"):
      continue
    baselines = [k for k, others in experiments.items() if k[:4] == key[:4]
                 and not others[0].optimizer.startswith("entropy_sgd")]
    # The baselines of its own budget; a recipe that gives each optimizer
    # its own budget (the paper's) has none, so all of the recipe's.
    baselines = [k for k in baselines if k[4] == key[4]] or baselines
    for other_key in baselines:
      others = experiments[other_key]
      cells = []
      for name, _, _ in MEASURES:
        a = _mean_std([m.measures[name] for m in members])
        b = _mean_std([m.measures[name] for m in others])
        error = (math.sqrt(a[1]**2 / a[2] + b[1]**2 / b[2])
                 if a[2] > 1 and b[2] > 1 else math.nan)
        cells.append(f"{_fmt(a[0] - b[0])} ± {_fmt(error, 2)}")
      budget = (str(key[4]) if other_key[4] == key[4] else
                f"{key[4]} vs {other_key[4]}")
      lines.append("| " + " | ".join([str(k) for k in key[:4]] +
                                     [budget, other_key[-1]] + cells) + " |")
  lines += ["", "## Rank correlation with the gap, over all runs of a "
            "dataset (Kendall tau-b, bootstrap 95% interval over runs)", "",
            "| dataset | runs | measure | tau | 95% interval | what it is |",
            "|---|---|---|---|---|---|"]
  for dataset in sorted({r.dataset for r in runs}):
    members = [r for r in runs if r.dataset == dataset]
    for attribute, remedy in (
        ("heldout_split", "measure runs that hold out a validation split "
         "apart from runs that do not"),
        ("recalibration", "re-measure the runs' training error with one "
         "--recalibration_augment (docs/flatness.md)"),
        ("heldout_source", "re-measure the runs' train/ with "
         "//launch:landscape --batches=0 --measures= (docs/flatness.md), "
         "which also measures the held-out error")):
      if len({getattr(r, attribute) for r in members}) > 1:
        raise ReportError(
            f"{dataset}: the runs' gaps are not comparable, their "
            f"{attribute} differs ({_describe(members, attribute)}); "
            f"{remedy}.")
    for name, _, about in MEASURES:
      pairs = [(r.measures[name], r.gap) for r in members
               if math.isfinite(r.measures[name])]
      if len(pairs) < 3:
        continue
      x, y = zip(*pairs)
      low, high = bootstrap_interval(x, y)
      lines.append(f"| {dataset} | {len(pairs)} | {name} | "
                   f"{_fmt(kendall_tau(x, y), 3)} | [{_fmt(low, 2)}, "
                   f"{_fmt(high, 2)}] | {about} |")
      written.append(_scatter(members, name, about, dataset, output_dir))
  lines += [""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})"
                   for p in written[1:]]
  markdown = os.path.join(output_dir, "flatness.md")
  with open(markdown, "w") as f:
    f.write("\n".join(lines) + "\n")
  return [markdown] + written


def _describe(runs, attribute) -> str:
  """The values of `attribute` over `runs`, e.g. "validation" or "a / b"."""
  return " / ".join(sorted({str(getattr(r, attribute)) for r in runs}))


def _scatter(runs, name, about, dataset, output_dir) -> str:
  figure = Figure(figsize=(5.5, 4))
  axis = figure.subplots()
  label_of = lambda r: f"{r.model}, {r.label}, {r.budget} epochs"
  labels = sorted({label_of(r) for r in runs})
  for index, label in enumerate(labels):
    points = [(r.measures[name], r.gap) for r in runs
              if label_of(r) == label and math.isfinite(r.measures[name])]
    if points:
      x, y = zip(*points)
      axis.scatter(x, y, color=f"C{index % 10}", label=label,
                   marker="o" if "entropy_sgd" in label else "s")
  axis.set_xlabel(f"{name}\n({about})", fontsize=8)
  axis.set_ylabel(f"{_describe(runs, 'heldout_split')} − training error "
                  "(points)")
  if all(r.measures[name] > 0 for r in runs
         if math.isfinite(r.measures[name])):
    axis.set_xscale("log")
  axis.grid(alpha=0.3)
  axis.legend(fontsize=6)
  axis.set_title(f"{dataset}: {name} against the gap", fontsize=9)
  figure.tight_layout()
  path = os.path.join(output_dir, f"{dataset}_{name}.png")
  figure.savefig(path, dpi=110)
  return path
