"""Results of many runs: one table row and one curve per experiment.

Reads the run directories `entropy_sgd.train.training` writes (config.json,
summary.json once finished, TensorBoard events) and groups runs that are the
same experiment with different seeds. For each group it writes a row of
`results.md` and `results.csv`, and per (dataset, model) a PNG of test error
(and validation error, when held out) and training loss against effective
epochs, mean ± 1 std over seeds.

Grouping: two runs are one experiment when their configs agree on every
field except
* `IGNORED_FIELDS`: the seed, where the run and its data live, and settings
  that change neither the trajectory nor the measurements (logging cadence,
  checkpoints kept, XLA, steps per compiled call, op determinism, the TPU's
  address) beyond float round-off (the noise implementation);
* fields the run never reads (`config.unread_fields`: the Entropy-SGD
  fields for other optimizers, `momentum` for Entropy-SGD and Adam, the
  Parle fields without `--parle`, `num_devices` without
  `--strategy=mirrored`, `rotation_degrees` without a rotating
  augmentation, ...).
Everything else, `max_steps`, `epochs` and `eval_every_steps` included, tells
experiments apart.

Series and wall times come from `entropy_sgd.reports.events`, which also
serves the plots: steps become effective epochs, and a resumed run's later
event files replace what earlier ones logged from their first step on.
"""

import ast
import csv
import dataclasses
import json
import math
import os
import re
import typing
from typing import Any, Dict, List, Optional, Sequence, Tuple

from matplotlib.figure import Figure  # No pyplot: no global backend.
import numpy as np

from entropy_sgd.core import chrono
from entropy_sgd.reports import events
from entropy_sgd.train import config as config_lib
from entropy_sgd.train import run_dir as run_dir_lib
from entropy_sgd.workloads import models as models_lib

CONFIG_FILE = run_dir_lib.CONFIG_FILE
SUMMARY_FILE = run_dir_lib.SUMMARY_FILE
EVENT_FILE_GLOB = events.EVENT_FILE_GLOB
MARKDOWN_FILE = "results.md"
CSV_FILE = "results.csv"

# Fields that never tell experiments apart.
IGNORED_FIELDS = config_lib.NOT_EXPERIMENT_FIELDS | {
    "config_changes", config_lib.NOISE_IMPLEMENTATION,
    config_lib.NOISE_IMPLEMENTATION_REASON}
# Table 1 of the paper (pratikac/explore-hessian
# doc/chaudhari.choromanska.ea.iclr17.tex at 4eed403, `tab:expts`):
# (dataset, model family, opt) -> (error %, its std over runs, the effective
# epoch at which the 5-run mean curve reaches it; dnn/ploterrors.py marks
# these points). The SGD baseline of All-CNN-BN was Nesterov SGD (Sec. 5.2).
PAPER_TABLE_1 = {
    ("mnist", "mnistfc", "adam"): (1.39, 0.03, 66),
    ("mnist", "mnistfc", "entropy_sgd"): (1.37, 0.03, 120),
    ("mnist", "lenet", "adam"): (0.51, 0.01, 100),
    ("mnist", "lenet", "entropy_sgd"): (0.50, 0.01, 80),
    ("cifar10", "allcnn", "nesterov"): (7.71, 0.19, 180),
    ("cifar10", "allcnn", "entropy_sgd"): (7.81, 0.09, 160),
}

Series = events.Series
NotARunError = events.NotARunError


# Reading one run.


@dataclasses.dataclass
class Run:
  """One run directory, read."""
  run_dir: str
  config: Dict[str, Any]
  scalars: Dict[str, Series]
  wall_time_seconds: float
  summary: Optional[Dict[str, Any]]  # summary.json; None until finished.

  @property
  def finished(self) -> bool:
    return self.summary is not None

  def last_value(self, tag: str) -> float:
    """The last point of `tag`, NaN when it has none."""
    return float(self.scalars[tag][1][-1]) if tag in self.scalars else math.nan


def _coerce_hparam(value: Any, hint: Any) -> Any:
  """An hparams value (numbers are floats, None and tuples are strings) as
  the TrainConfig field type `hint`."""
  if isinstance(value, str) and hint is not str:
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      return value
  if (isinstance(value, float) and value.is_integer() and
      hint in (int, Optional[int])):
    return int(value)
  return value


def normalize_config(raw: Dict[str, Any], from_hparams: bool) -> Dict[str, Any]:
  """A config dict with TrainConfig's types; missing fields take defaults.

  Lists become tuples (JSON has no tuples) so that configs are hashable, and
  a field an older run did not know takes the value that run behaved as
  (`config.complete_record`), else TrainConfig's default.
  """
  raw = config_lib.complete_record(raw)
  hints = typing.get_type_hints(config_lib.TrainConfig)
  config = {field.name: field.default
            for field in dataclasses.fields(config_lib.TrainConfig)
            if field.default is not dataclasses.MISSING}
  for name, value in raw.items():
    if from_hparams:
      value = _coerce_hparam(value, hints.get(name, Any))
    config[name] = tuple(value) if isinstance(value, list) else value
  return config


def config_from_record(record: Dict[str, Any]) -> Dict[str, Any]:
  """A run's config.json, as read, normalised (`normalize_config`)."""
  return normalize_config(run_dir_lib.decode_config(
      record, config_lib.FLOAT_FIELDS), from_hparams=False)


def _read_json(path: str, run_dir: str) -> Dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise NotARunError(f"{run_dir}: cannot read {os.path.basename(path)} "
                       f"({e})") from None


def is_run_dir(path: str) -> bool:
  """Whether `path` looks like a run directory (config.json or events)."""
  return os.path.isdir(path) and (
      os.path.exists(os.path.join(path, CONFIG_FILE)) or
      bool(events.event_files(path)))


def load_run(run_dir: str) -> Run:
  """Reads one run directory; raises NotARunError naming what is missing."""
  if not os.path.isdir(run_dir):
    raise NotARunError(f"{run_dir}: no such directory")
  files = events.event_files(run_dir)
  if not files:
    raise NotARunError(f"{run_dir}: not a run directory, it has no "
                       f"TensorBoard event files ({EVENT_FILE_GLOB})")
  segments = [events.read_segment(f) for f in files]
  config_path = os.path.join(run_dir, CONFIG_FILE)
  if os.path.exists(config_path):
    config = config_from_record(_read_json(config_path, run_dir))
  else:  # Older runs: the hparams summary of the latest segment.
    hparams = [s.hparams for s in segments if s.hparams]
    if not hparams:
      raise NotARunError(f"{run_dir}: no {CONFIG_FILE} and no hparams "
                         f"summary in its events; cannot tell its settings")
    config = normalize_config(hparams[-1], from_hparams=True)
  summary_path = os.path.join(run_dir, SUMMARY_FILE)
  summary = (_read_json(summary_path, run_dir)
             if os.path.exists(summary_path) else None)
  return Run(run_dir=run_dir, config=config,
             scalars=events.to_effective_epochs(events.merge_segments(segments),
                                              run_dir),
             wall_time_seconds=events.wall_time_seconds(segments), summary=summary)


def expand_run_dirs(paths: Sequence[str]) -> List[str]:
  """Run directories named by `paths`, each a run or a parent of runs.

  A parent is expanded one level (its subdirectories that look like runs);
  duplicates are dropped.
  """
  run_dirs, seen = [], set()
  for path in paths:
    path = os.path.normpath(path)
    if not os.path.isdir(path):
      raise NotARunError(f"{path}: no such directory")
    if is_run_dir(path):
      found = [path]
    else:
      found = [os.path.join(path, name) for name in sorted(os.listdir(path))
               if is_run_dir(os.path.join(path, name))]
      if not found:
        raise NotARunError(
            f"{path}: neither a run directory (no {CONFIG_FILE}, no event "
            f"files) nor a parent of run directories")
    for run_dir in found:
      if os.path.realpath(run_dir) not in seen:
        seen.add(os.path.realpath(run_dir))
        run_dirs.append(run_dir)
  return run_dirs


# Grouping.


def experiment_settings(config: Dict[str, Any]) -> Dict[str, Any]:
  """The fields of `config` that define the experiment (see module doc)."""
  ignored = set(IGNORED_FIELDS) | config_lib.unread_fields(config)
  return {k: v for k, v in config.items() if k not in ignored}


def optimizer_label(config: Dict[str, Any]) -> str:
  """E.g. "nesterov", "entropy_sgd (L=20)", "entropy_sgd (L=20, Parle)",
  "nesterov (mixed_bfloat16)": the precision when it is not float32."""
  opt = str(config.get("opt"))
  mixed = config.get("precision", "float32")
  mixed = "" if mixed == "float32" else f", {mixed}"
  if opt == "sam":
    name = "asam" if config.get("sam_adaptive") else "sam"
    rho = config.get("sam_rho")
    rho = config_lib.SAM_DEFAULT_RHO[bool(config.get("sam_adaptive"))] if (
        rho is None) else rho
    return f"{name} (rho={rho}{mixed})"
  if opt != "entropy_sgd":
    return f"{opt} ({mixed[2:]})" if mixed else opt
  parle = ", Parle" if config.get("parle") else ""
  return f"{opt} (L={config.get('L')}{parle}{mixed})"


def _format_setting(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(str(v) for v in value) + ")"
  return str(value)


def distinguishing_labels(settings: Sequence[Dict[str, Any]]) -> List[str]:
  """For each of look-alike experiments' settings, those in which they
  differ, e.g. "lr=0.05, weight_decay=5e-05"; "" for each when alone."""
  missing = object()
  names = sorted(set().union(*settings)) if len(settings) > 1 else []
  differing = [n for n in names
               if len({repr(s.get(n, missing)) for s in settings}) > 1]
  return [", ".join(f"{n}={_format_setting(s.get(n))}" for n in differing)
          for s in settings]


@dataclasses.dataclass
class Group:
  """Runs of one experiment, one per seed."""
  settings: Dict[str, Any]
  runs: List[Run]
  distinguishing: str = ""  # Settings that tell it from its look-alikes.

  @property
  def dataset(self) -> str:
    return str(self.settings.get("dataset"))

  @property
  def model(self) -> str:
    return str(self.settings.get("model"))

  @property
  def optimizer(self) -> str:
    return optimizer_label(self.settings)

  @property
  def label(self) -> str:
    extra = f", {self.distinguishing}" if self.distinguishing else ""
    return f"{self.optimizer}{extra}"


def group_runs(runs: Sequence[Run]) -> List[Group]:
  """Groups runs by experiment, sorted by dataset, model and optimizer.

  Groups that share dataset, model and optimizer label get `distinguishing`:
  the settings in which they differ, e.g. "lr=0.05, max_steps=100".
  """
  by_key: Dict[Tuple, Group] = {}
  for run in runs:
    settings = experiment_settings(run.config)
    key = tuple(sorted(settings.items()))
    by_key.setdefault(key, Group(settings, [])).runs.append(run)
  groups = list(by_key.values())
  look_alikes: Dict[Tuple[str, str, str], List[Group]] = {}
  for group in groups:
    look_alikes.setdefault((group.dataset, group.model, group.optimizer),
                           []).append(group)
  for similar in look_alikes.values():
    for group, label in zip(similar, distinguishing_labels(
        [g.settings for g in similar])):
      group.distinguishing = label
  for group in groups:
    group.runs.sort(key=lambda r: (r.config.get("seed"), r.run_dir))
  return sorted(groups, key=lambda g: (g.dataset, g.model, g.optimizer,
                                       g.distinguishing))


# One row per group.


def mean_and_std(values: Sequence[float]) -> Tuple[float, float]:
  """Mean and sample std (ddof=1) of the finite values; NaN when undefined."""
  finite = np.array([v for v in values if np.isfinite(v)], np.float64)
  if not finite.size:
    return math.nan, math.nan
  std = float(np.std(finite, ddof=1)) if finite.size > 1 else math.nan
  return float(np.mean(finite)), std


def error_percent(accuracy: float) -> float:
  return 100.0 * (1.0 - accuracy)


@dataclasses.dataclass
class Row:
  """One group's numbers; errors in %, NaN where undefined."""
  dataset: str
  model: str
  optimizer: str
  settings: str
  effective_epochs: float
  seeds: int
  finished_seeds: int
  final_test_error_mean: float
  final_test_error_std: float
  best_test_error_mean: float
  final_validation_error_mean: float
  final_validation_error_std: float
  wall_time_seconds: float
  run_dirs: str  # ";"-separated.
  # The paper's protocol (Table 1), where it has the experiment; NaN
  # elsewhere. The mean curve is the mean over seeds of the test error.
  paper_error: float = math.nan
  paper_error_std: float = math.nan
  paper_epoch: float = math.nan
  mean_curve_error_at_paper_epoch: float = math.nan
  mean_curve_epoch_nearest_paper: float = math.nan
  mean_curve_min_error: float = math.nan
  mean_curve_min_epoch: float = math.nan


# How far (a fraction of the quoted epoch, at least 1 effective epoch) the
# evaluation read for Table 1's protocol may lie from the quoted epoch.
PAPER_EPOCH_TOLERANCE = 0.05


def paper_entry(settings: Dict[str, Any]):
  """Table 1's (error, std, epoch) for a group's settings, or None.

  Only runs of `--recipe=paper` are the paper's experiment: the reference
  code's recipe on the same nets is another one (docs/training.md).
  """
  if settings.get("recipe", "reference_code") != "paper":
    return None
  try:
    family = models_lib.model_family(str(settings.get("model")))
  except ValueError:
    return None
  opt = settings.get("opt")
  if opt == "sgd" and settings.get("dataset") != "mnist":
    opt = None  # Table 1's SGD is Nesterov's.
  if settings.get("parle") or settings.get("precision", "float32") != (
      "float32"):
    return None
  return PAPER_TABLE_1.get((settings.get("dataset"), family, opt))


def paper_protocol(series: Sequence[Series], epoch: float
                   ) -> Tuple[float, float, float, float]:
  """Reads the mean test-error curve as Table 1 was read.

  Returns (error of the mean curve at the evaluation nearest `epoch`, that
  evaluation's effective epoch, the minimum of the mean curve, its epoch).
  The nearest evaluation, not an interpolation: an Entropy-SGD epoch ends at
  19.97 effective epochs on MNIST (468 outer steps of 20 batches of 128).
  """
  if not series:
    return (math.nan,) * 4
  grid, mean, _ = mean_curve(series)
  finite = np.isfinite(mean)
  if not finite.any():
    return (math.nan,) * 4
  grid, mean = grid[finite], mean[finite]
  nearest = int(np.argmin(np.abs(grid - epoch)))
  lowest = int(np.argmin(mean))
  at_epoch = float(mean[nearest])
  if abs(grid[nearest] - epoch) > max(1.0, PAPER_EPOCH_TOLERANCE * epoch):
    at_epoch = math.nan  # The curve has no evaluation there (yet).
  return (at_epoch, float(grid[nearest]), float(mean[lowest]),
          float(grid[lowest]))


def summarize_group(group: Group) -> Row:
  """The table row of `group`."""
  runs = group.runs
  final_test = [error_percent(r.last_value("test/accuracy")) for r in runs]
  best_test = [error_percent(float(np.max(r.scalars["test/accuracy"][1])))
               for r in runs if "test/accuracy" in r.scalars]
  final_validation = [error_percent(r.last_value("validation/accuracy"))
                      for r in runs]
  test_mean, test_std = mean_and_std(final_test)
  validation_mean, validation_std = mean_and_std(final_validation)
  paper = {}
  entry = paper_entry(group.settings)
  if entry is not None:
    at_epoch, nearest, lowest, lowest_epoch = paper_protocol(
        _panel_series(group, "test error (%)"), entry[2])
    paper = dict(paper_error=entry[0], paper_error_std=entry[1],
                 paper_epoch=float(entry[2]),
                 mean_curve_error_at_paper_epoch=at_epoch,
                 mean_curve_epoch_nearest_paper=nearest,
                 mean_curve_min_error=lowest,
                 mean_curve_min_epoch=lowest_epoch)
  return Row(**paper,
      dataset=group.dataset, model=group.model, optimizer=group.optimizer,
      settings=group.distinguishing,
      effective_epochs=mean_and_std(
          [r.last_value("progress/effective_epoch") for r in runs])[0],
      seeds=len(runs), finished_seeds=sum(r.finished for r in runs),
      final_test_error_mean=test_mean, final_test_error_std=test_std,
      best_test_error_mean=mean_and_std(best_test)[0],
      final_validation_error_mean=validation_mean,
      final_validation_error_std=validation_std,
      wall_time_seconds=mean_and_std(
          [r.wall_time_seconds for r in runs])[0],
      run_dirs=";".join(r.run_dir for r in runs))


def format_mean_std(mean: float, std: float, seeds: int) -> str:
  """"12.34 ± 0.56"; "12.34 ± —" for one seed; "n/a" without values."""
  if not math.isfinite(mean):
    return "n/a"
  if seeds < 2 or not math.isfinite(std):
    return f"{mean:.2f} ± —"
  return f"{mean:.2f} ± {std:.2f}"


def _format_number(value: float) -> str:
  return "n/a" if not math.isfinite(value) else f"{value:.2f}"


MARKDOWN_HEADER = f"""\
# Results

One row per experiment: runs whose configs differ only in the seed, in
fields their optimizer does not read, or in settings that change neither
training nor measurement
({", ".join(sorted(IGNORED_FIELDS - {"seed"}))}).
`settings` shows what tells apart rows with the same dataset, model and
optimizer.

- **errors** are 100 − accuracy, in %. `a ± s` is the mean over seeds ± the
  sample standard deviation (ddof = 1); `—` when there is one seed.
- **final** is each seed's last evaluation; **best** is each seed's lowest
  test error over its evaluations, averaged over seeds (optimistic: it picks
  the epoch on the test set).
- **effective epochs** = gradient evaluations × batch / training examples,
  the last one logged, mean over seeds (Entropy-SGD does L per step).
- **finished**: seeds whose whole schedule ran (summary.json); the others
  are still running or were stopped early (e.g. by max_steps).
- **wall time**: mean per seed, summed over the run's segments (starts),
  without the pauses between them.
"""


def write_markdown(rows: Sequence[Row], path: str,
                   plots: Sequence[str] = ()) -> str:
  """Writes the table with its reading guide and plot links; returns path."""
  with_validation = any(math.isfinite(r.final_validation_error_mean)
                        for r in rows)
  columns = ["dataset", "model", "optimizer", "settings", "effective epochs",
             "seeds", "finished", "final test error (%)",
             "best test error (%)"]
  if with_validation:
    columns.append("final validation error (%)")
  columns.append("wall time / seed")
  lines = [MARKDOWN_HEADER, "| " + " | ".join(columns) + " |",
           "|" + "---|" * len(columns)]
  for r in rows:
    cells = [r.dataset, r.model, r.optimizer, r.settings or " ",
             _format_number(r.effective_epochs), str(r.seeds),
             str(r.finished_seeds),
             format_mean_std(r.final_test_error_mean, r.final_test_error_std,
                             r.seeds),
             _format_number(r.best_test_error_mean)]
    if with_validation:
      cells.append(format_mean_std(r.final_validation_error_mean,
                                   r.final_validation_error_std, r.seeds))
    cells.append(chrono.format_duration(r.wall_time_seconds))
    lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) +
                 " |")
  lines += _paper_protocol_table(rows)
  if plots:
    lines += ["", "Test error and training loss against effective epochs, "
              "mean ± 1 std over seeds:", ""]
    lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})"
              for p in plots]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def _paper_protocol_table(rows: Sequence[Row]) -> List[str]:
  """Markdown lines of the rows that Table 1 of the paper has, read its way."""
  rows = [r for r in rows if math.isfinite(r.paper_error)]
  if not rows:
    return []
  lines = [
      "", "## By the paper's protocol (Table 1)", "",
      "Table 1 quotes, per experiment, the test error of the 5-run **mean "
      "curve** at one effective epoch (its \"Epochs\" column), not a final "
      "error. Here: the mean curve over our seeds at the evaluation nearest "
      "that epoch, and the curve's minimum with its epoch (both read on the "
      "test set, as the paper's \"validation\" curves were).", "",
      "| dataset | model | optimizer | settings | seeds | paper: error (%) at "
      "epoch | ours: mean curve at that epoch (%) | ours: mean-curve minimum "
      "(%) at epoch | ours: final test error (%) |",
      "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append("| " + " | ".join([
        r.dataset, r.model, r.optimizer, r.settings or " ", str(r.seeds),
        f"{r.paper_error:.2f} ± {r.paper_error_std:.2f} at "
        f"{r.paper_epoch:.0f}",
        f"{_format_number(r.mean_curve_error_at_paper_epoch)} (at "
        f"{_format_number(r.mean_curve_epoch_nearest_paper)})",
        f"{_format_number(r.mean_curve_min_error)} at "
        f"{_format_number(r.mean_curve_min_epoch)}",
        format_mean_std(r.final_test_error_mean, r.final_test_error_std,
                        r.seeds)]) + " |")
  return lines


def write_csv(rows: Sequence[Row], path: str) -> str:
  """Writes the rows as plain numbers (empty cell: undefined); returns path."""
  names = [field.name for field in dataclasses.fields(Row)]
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(names)
    for row in rows:
      values = [getattr(row, name) for name in names]
      writer.writerow(["" if isinstance(v, float) and not math.isfinite(v)
                       else repr(float(v)) if isinstance(v, float) else v
                       for v in values])
  return path


# Plots.


def mean_curve(series: Sequence[Series]) -> Tuple[np.ndarray, np.ndarray,
                                                   np.ndarray]:
  """Mean and std (ddof=1, NaN for one seed) of several seeds' curves.

  The x grid is the union of the seeds' points; each seed is linearly
  interpolated onto it. Where every seed covers, the grid is cut to the range
  they share; when they share none, each point averages the seeds that cover
  it (no extrapolation).
  """
  grid = np.unique(np.concatenate([x for x, _ in series]))
  start = max(x[0] for x, _ in series)
  end = min(x[-1] for x, _ in series)
  if start <= end:
    grid = grid[(grid >= start) & (grid <= end)]
  values = np.full((len(series), grid.size), np.nan)
  for i, (x, y) in enumerate(series):
    covered = (grid >= x[0]) & (grid <= x[-1])
    values[i, covered] = np.interp(grid[covered], x, y)
  counts = np.sum(np.isfinite(values), axis=0)
  mean = np.nanmean(values, axis=0)
  std = np.full(grid.size, np.nan)
  several = counts > 1
  std[several] = np.nanstd(values[:, several], axis=0, ddof=1)
  return grid, mean, std


_ERROR_PANELS = {"test error (%)": "test/accuracy",
                 "validation error (%)": "validation/accuracy"}


def _panel_series(group: Group, panel: str) -> List[Series]:
  if panel in _ERROR_PANELS:
    tag = _ERROR_PANELS[panel]
    return [(r.scalars[tag][0], error_percent(r.scalars[tag][1]))
            for r in group.runs if tag in r.scalars]
  return [r.scalars["train/loss"] for r in group.runs
          if "train/loss" in r.scalars]


def plot_file_name(dataset: str, model: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{dataset}_{model}") + ".png"


def plot_groups(groups: Sequence[Group], output_dir: str) -> List[str]:
  """One PNG per (dataset, model); returns their paths."""
  by_model: Dict[Tuple[str, str], List[Group]] = {}
  for group in groups:
    by_model.setdefault((group.dataset, group.model), []).append(group)
  paths = []
  for (dataset, model), similar in sorted(by_model.items()):
    panels = ["test error (%)", "training loss"]
    if any(_panel_series(group, "validation error (%)") for group in similar):
      panels.insert(0, "validation error (%)")
    figure = Figure(figsize=(6 * len(panels), 4.5))
    axes = figure.subplots(1, len(panels))
    for panel, axis in zip(panels, axes):
      for index, group in enumerate(similar):
        series = _panel_series(group, panel)
        if not series:
          continue
        x, mean, std = mean_curve(series)
        color = f"C{index % 10}"
        axis.plot(x, mean, color=color, marker="o" if x.size < 30 else None,
                  label=f"{group.label} ({len(series)} "
                  f"seed{'s' if len(series) > 1 else ''})")
        axis.fill_between(x, mean - std, mean + std, color=color, alpha=0.2)
      axis.set_xlabel("effective epochs")
      axis.set_ylabel(panel)
      axis.grid(alpha=0.3)
      if axis.has_data():
        axis.legend(fontsize=8)
    figure.suptitle(f"{dataset}, {model}: mean ± 1 std over seeds")
    figure.tight_layout()
    path = os.path.join(output_dir, plot_file_name(dataset, model))
    figure.savefig(path, dpi=110)
    paths.append(path)
  return paths


# Settings that only set a budget and its schedule: a budget plot joins
# groups that differ in nothing else.
BUDGET_FIELDS = ("epochs", "lr_decay_epochs", "eval_every_steps", "max_steps")


def budget_plot_file_name(dataset: str, model: str) -> str:
  return plot_file_name(dataset, model)[:-len(".png")] + "_budgets.png"


def _family(group: Group) -> str:
  """The group's label without its budget settings."""
  kept = [part for part in group.distinguishing.split(", ")
          if part and part.split("=")[0] not in BUDGET_FIELDS]
  return ", ".join([group.optimizer] + kept)


@dataclasses.dataclass
class BudgetPoint:
  """One group's final error at its budget; errors in %."""
  effective_epochs: float
  wall_time_hours: float  # Mean per seed.
  error_mean: float
  error_std: float  # NaN with one seed.
  seeds: int


def budget_points(groups: Sequence[Group]
                  ) -> Dict[Tuple[str, str, str], Dict[str, List[BudgetPoint]]]:
  """(dataset, model, held-out split) -> family -> points by budget, for each
  (dataset, model) with a family at two budgets or more. The error is the
  final validation error where any group held one out, else the test
  error; a family joins groups that differ only in BUDGET_FIELDS."""
  by_model: Dict[Tuple[str, str], Dict[str, List[Row]]] = {}
  for group in groups:
    families = by_model.setdefault((group.dataset, group.model), {})
    families.setdefault(_family(group), []).append(summarize_group(group))
  points = {}
  for (dataset, model), families in sorted(by_model.items()):
    if not any(len({round(r.effective_epochs) for r in rows}) > 1
               for rows in families.values()):
      continue
    split = ("validation" if any(
        math.isfinite(r.final_validation_error_mean)
        for rows in families.values() for r in rows) else "test")
    points[(dataset, model, split)] = {
        family: [BudgetPoint(
            effective_epochs=r.effective_epochs,
            wall_time_hours=r.wall_time_seconds / 3600.0,
            error_mean=getattr(r, f"final_{split}_error_mean"),
            error_std=getattr(r, f"final_{split}_error_std"),
            seeds=r.seeds)
                 for r in sorted(rows, key=lambda r: r.effective_epochs)]
        for family, rows in sorted(families.items())}
  return points


def plot_budgets(groups: Sequence[Group], output_dir: str) -> List[str]:
  """One PNG per (dataset, model) of `budget_points`: final error against
  effective epochs and against wall-clock hours per seed, a line per family,
  mean ± 1 std over seeds. Returns the paths."""
  paths = []
  for (dataset, model, split), families in budget_points(groups).items():
    figure = Figure(figsize=(12, 4.5))
    axes = figure.subplots(1, 2)
    for index, (family, points) in enumerate(families.items()):
      mean = [p.error_mean for p in points]
      std = [p.error_std if math.isfinite(p.error_std) else 0.0
             for p in points]
      seeds = "/".join(str(p.seeds) for p in points)
      for axis, x in zip(axes, ([p.effective_epochs for p in points],
                                [p.wall_time_hours for p in points])):
        axis.errorbar(x, mean, yerr=std, color=f"C{index % 10}", marker="o",
                      capsize=3, label=f"{family} (seeds {seeds})")
    for axis, xlabel in zip(axes, ("effective epochs (gradient evaluations "
                                   "× batch / training examples)",
                                   "wall-clock hours per seed")):
      axis.set_xlabel(xlabel)
      axis.set_ylabel(f"final {split} error (%)")
      axis.grid(alpha=0.3)
      axis.legend(fontsize=7)
    figure.suptitle(f"{dataset}, {model}: final error against budget, "
                    "mean ± 1 std over seeds")
    figure.tight_layout()
    path = os.path.join(output_dir, budget_plot_file_name(dataset, model))
    figure.savefig(path, dpi=110)
    paths.append(path)
  return paths


@dataclasses.dataclass
class WrittenFiles:
  markdown: str
  csv: str
  plots: List[str]


def write_results(paths: Sequence[str], output_dir: str) -> WrittenFiles:
  """Reads runs (or parents of runs), writes table, CSV and plots."""
  runs = [load_run(d) for d in expand_run_dirs(paths)]
  groups = group_runs(runs)
  rows = [summarize_group(g) for g in groups]
  os.makedirs(output_dir, exist_ok=True)
  plots = plot_groups(groups, output_dir) + plot_budgets(groups, output_dir)
  return WrittenFiles(
      markdown=write_markdown(rows, os.path.join(output_dir, MARKDOWN_FILE),
                              plots),
      csv=write_csv(rows, os.path.join(output_dir, CSV_FILE)), plots=plots)
