"""The TensorBoard events of a run directory, read back.

One reader for every tool (results tables, plots). TensorBoard's step axis
is gradient evaluations; it becomes effective epochs by the ratio of the
last `progress/effective_epoch` point to its step. A resumed run has one
event file (segment) per start; a later segment replaces what earlier ones
logged from its first step on (those points belonged to the interrupted
trajectory), and the run's wall time is the sum over segments of last minus
first event time.
"""

import dataclasses
import glob
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata

EVENT_FILE_GLOB = "events.out.tfevents.*"

Series = Tuple[np.ndarray, np.ndarray]  # (effective epochs, values), sorted.


class NotARunError(ValueError):
  """A directory is not a readable run directory; the message says why."""


@dataclasses.dataclass
class Segment:
  """One event file: what one start of the run logged."""
  first_wall_time: float
  last_wall_time: float
  points: Dict[str, Dict[int, float]]  # tag -> {step: value}
  hparams: Optional[Dict[str, Any]]  # The hparams summary, if any.

  @property
  def first_step(self) -> Optional[int]:
    steps = [min(points) for points in self.points.values() if points]
    return min(steps) if steps else None


def _scalar_value(value) -> Optional[float]:
  """A summary value as a float, None unless it is a numeric scalar."""
  if value.tag.startswith("_hparams_/"):
    return None
  if value.HasField("tensor"):
    array = tf.make_ndarray(value.tensor)
    if array.ndim or array.dtype.kind not in "fiu":
      return None
    return float(array)
  if value.WhichOneof("value") == "simple_value":  # TF1-style summaries.
    return float(value.simple_value)
  return None


def _hparams_of(value) -> Optional[Dict[str, Any]]:
  """The hyperparameters of an hparams session-start summary, else None."""
  if (value.tag != hparams_metadata.SESSION_START_INFO_TAG or
      not value.metadata.plugin_data.content):
    return None
  info = hparams_metadata.parse_session_start_info_plugin_data(
      value.metadata.plugin_data.content)
  return {name: getattr(v, v.WhichOneof("kind"))
          for name, v in info.hparams.items() if v.WhichOneof("kind")}


def read_segment(event_file: str) -> Segment:
  """Scalars, wall times and hparams of one event file.

  A record cut short (the run is still writing) ends the file early.
  """
  points, hparams, wall_times = {}, None, []
  records = iter(tf.data.TFRecordDataset(event_file))
  while True:
    try:
      record = next(records)
    except StopIteration:
      break
    except tf.errors.DataLossError:
      break
    event = event_pb2.Event.FromString(record.numpy())
    wall_times.append(event.wall_time)
    for value in event.summary.value:
      hparams = _hparams_of(value) or hparams
      scalar = _scalar_value(value)
      if scalar is not None:
        points.setdefault(value.tag, {})[event.step] = scalar
  if not wall_times:
    return Segment(math.nan, math.nan, {}, None)
  return Segment(min(wall_times), max(wall_times), points, hparams)


def merge_segments(segments: Sequence[Segment]) -> Dict[str, Dict[int, float]]:
  """The run's points by tag; a later segment overrides from its first step.

  A resumed run restarts from a checkpoint at or before the first step it
  logs again, so whatever earlier segments logged from that step on belongs
  to the interrupted trajectory and is dropped.
  """
  merged: Dict[str, Dict[int, float]] = {}
  for segment in sorted(segments, key=lambda s: s.first_wall_time):
    restart = segment.first_step
    if restart is not None:
      for points in merged.values():
        for step in [s for s in points if s >= restart]:
          del points[step]
    for tag, points in segment.points.items():
      merged.setdefault(tag, {}).update(points)
  return merged


def wall_time_seconds(segments: Sequence[Segment]) -> float:
  """Training time: per segment last minus first event, summed (no gaps)."""
  return float(sum(s.last_wall_time - s.first_wall_time for s in segments
                   if not math.isnan(s.first_wall_time)))


def to_effective_epochs(points: Dict[str, Dict[int, float]],
                        run_dir: str) -> Dict[str, Series]:
  """Sorted series by tag, steps converted to effective epochs."""
  progress = points.get("progress/effective_epoch")
  if not progress:
    raise NotARunError(
        f"{run_dir}: its events have no progress/effective_epoch scalar "
        f"(training has not logged a step yet?)")
  last_step = max(progress)
  epochs_per_step = progress[last_step] / last_step if last_step else 0.0
  series = {}
  for tag, by_step in points.items():
    steps = np.array(sorted(by_step), np.float64)
    series[tag] = (steps * epochs_per_step,
                   np.array([by_step[s] for s in sorted(by_step)]))
  return series


def event_files(run_dir: str) -> List[str]:
  return sorted(glob.glob(os.path.join(glob.escape(run_dir),
                                       EVENT_FILE_GLOB)))


def read_scalars(run_dir: str) -> Dict[str, Series]:
  """Every scalar series of a run (all its segments), by tag."""
  files = event_files(run_dir)
  if not files:
    raise NotARunError(f"{run_dir}: not a run directory, it has no "
                       f"TensorBoard event files ({EVENT_FILE_GLOB})")
  return to_effective_epochs(merge_segments([read_segment(f) for f in files]),
                             run_dir)
