"""The run directory: its files, their format, and the guards around them.

One run of `entropy_sgd.train.training` owns one directory:

    config.json        the run's TrainConfig (strict JSON), the noise
                       implementation its last start resolved
                       (`noise_implementation` and `..._reason`), and the
                       history of the overridden changes (`config_changes`)
    summary.json       written once the whole schedule has run
    checkpoints/       tf.train.CheckpointManager's ckpt-N.{index,data-*}
                       and its `checkpoint` state file
    events.out.tfevents.*   TensorBoard, one file per start (segment)
    .lock              held (fcntl) by the chief process while it trains

This module writes and reads them, for training and for the tools that read
finished runs (results, landscape). Its guards:

* `RunLock`: one process per run directory; the OS drops the lock when the
  holder dies, so a killed run resumes with no clean-up.
* `newest_intact_checkpoint`: a checkpoint that does not read back (a
  truncated data file, a missing or damaged index, a damaged state file) or
  holds non-finite values is passed over with one warning and renamed
  `*.damaged`, so neither rotation nor a later restore counts it; with none
  intact, `RunDirError` names the files and deletes nothing.
* `check_resume`: a resume under settings that define another experiment is
  refused, unless overridden, and then recorded.
* Strict JSON: non-finite floats are written as the strings "inf", "-inf",
  "nan" (`rho` is inf by default), which `read_config` turns back.
"""

import errno
import fcntl
import glob
import json
import math
import os
import re
import socket
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import tensorflow as tf

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".lock"
CHECKPOINT_SUBDIR = "checkpoints"
CHECKPOINT_STATE_FILE = "checkpoint"  # tf.train.CheckpointManager's.
CHECKPOINT_PREFIX = "ckpt"
DAMAGED_SUFFIX = ".damaged"
CHANGES_KEY = "config_changes"  # In config.json: the overridden changes.

_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def resolve_user_path(path: Optional[str]) -> Optional[str]:
  """Resolves a relative path against where `bazel run` was called from."""
  if path is None or os.path.isabs(path):
    return path
  base = os.environ.get("BUILD_WORKING_DIRECTORY", os.getcwd())
  return os.path.normpath(os.path.join(base, path))


class RunDirError(RuntimeError):
  """The run directory cannot be used as it is; the message says why and
  what to do (one line)."""


# ------------------------------------------------------------ Strict JSON.


def _strict(value):
  if isinstance(value, float) and not math.isfinite(value):
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
  if isinstance(value, dict):
    return {k: _strict(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_strict(v) for v in value]
  return value


def write_json(path: str, values: Dict[str, Any]):
  """Writes strict JSON atomically (a temporary file, then a rename)."""
  temporary = path + ".tmp"
  try:
    with open(temporary, "w") as f:
      json.dump(_strict(values), f, indent=1, sort_keys=True,
                allow_nan=False)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except OSError as e:
    _remove_quietly(temporary)
    raise disk_error(path, e) from None


def read_json(path: str) -> Dict[str, Any]:
  """A JSON file of the run directory (also the non-strict older ones)."""
  with open(path) as f:
    return json.load(f)


def decode_config(values: Dict[str, Any], float_fields: Sequence[str]
                  ) -> Dict[str, Any]:
  """`values` with "inf"/"-inf"/"nan" strings of `float_fields` as floats."""
  return {k: (_NON_FINITE[v] if k in float_fields and isinstance(v, str)
              and v in _NON_FINITE else v) for k, v in values.items()}


def disk_error(path: str, error: OSError) -> RunDirError:
  """The one-line error of a failed write (e.g. ENOSPC)."""
  code = errno.errorcode.get(error.errno, str(error.errno))
  advice = ("free some space and rerun the same command: the run resumes "
            "from its last intact checkpoint" if error.errno in (
                errno.ENOSPC, errno.EDQUOT) else
            "fix the cause and rerun the same command: the run resumes "
            "from its last intact checkpoint")
  return RunDirError(f"cannot write {path}: {error.strerror or error} "
                     f"({code}); {advice}.")


def _remove_quietly(path):
  try:
    os.remove(path)
  except OSError:
    pass


# ------------------------------------------------------------------- Lock.


class RunLock:
  """An exclusive `fcntl` lock on `run_dir/.lock`, held until `release`.

  The lock file says who holds it ("pid PID on HOST"), for the message a
  second process gets. The OS releases the lock when the process ends, however
  it ends, so no stale lock survives a SIGKILL.
  """

  def __init__(self, run_dir: str):
    self.path = os.path.join(run_dir, LOCK_FILE)
    self._file = None
    try:
      handle = open(self.path, "a+")
    except OSError as e:
      raise disk_error(self.path, e) from None
    try:
      fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        handle.close()
        raise disk_error(self.path, e) from None
      handle.seek(0)
      holder = handle.read().strip() or "another process"
      handle.close()
      raise RunDirError(
          f"{run_dir} is in use: {holder} is training in it (lock "
          f"{self.path}); wait for it to finish, stop it, or pass another "
          f"--run_name or --log_dir.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    self._file = handle

  def release(self):
    if self._file is not None:
      self._file.close()  # Drops the lock.
      self._file = None


# ------------------------------------------------------------ Checkpoints.


def checkpoint_dir(run_dir: str) -> str:
  return os.path.join(run_dir, CHECKPOINT_SUBDIR)


def _checkpoint_number(prefix: str) -> int:
  match = re.fullmatch(rf"{CHECKPOINT_PREFIX}-(\d+)", os.path.basename(prefix))
  return int(match.group(1)) if match else -1


def _is_damaged(path: str) -> bool:
  return DAMAGED_SUFFIX in os.path.basename(path)


def _checkpoint_files(prefix: str) -> List[str]:
  """The index and data files of the checkpoint at `prefix` (not those
  moved aside)."""
  return sorted(p for p in glob.glob(glob.escape(prefix) + ".index") +
                glob.glob(glob.escape(prefix) + ".data-*")
                if not _is_damaged(p))


def listed_checkpoints(directory: str) -> List[str]:
  """Every checkpoint prefix on disk (an index or a data file), newest
  first, whatever the state file says."""
  prefixes = set()
  for path in glob.glob(os.path.join(glob.escape(directory),
                                     f"{CHECKPOINT_PREFIX}-*")):
    if _is_damaged(path):
      continue
    prefix = re.sub(r"\.(index|data-\d+-of-\d+)$", "", path)
    if _checkpoint_number(prefix) >= 0:
      prefixes.add(prefix)
  return sorted(prefixes, key=_checkpoint_number, reverse=True)


def check_checkpoint(prefix: str) -> Optional[str]:
  """Why the checkpoint at `prefix` cannot be resumed from, or None.

  Reads every tensor back (so a truncated data file shows) and requires
  floating ones to be finite.
  """
  if not os.path.exists(prefix + ".index"):
    return "its index file is missing"
  if not [p for p in _checkpoint_files(prefix) if ".data-" in p]:
    return "its data file is missing"
  try:
    reader = tf.train.load_checkpoint(prefix)
    for name in reader.get_variable_to_shape_map():
      value = np.asarray(reader.get_tensor(name))
      if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
        return f"{name} holds NaN or Inf"
  except (tf.errors.OpError, ValueError, IndexError, OSError,
          RuntimeError) as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"it does not read back ({reason[:160]})"
  return None


def _move_aside(paths: Sequence[str]) -> List[str]:
  """Renames each path to PATH.damaged (PATH.damaged-2, ... if taken)."""
  moved = []
  for path in paths:
    target, count = path + DAMAGED_SUFFIX, 1
    while os.path.exists(target):
      count += 1
      target = f"{path}{DAMAGED_SUFFIX}-{count}"
    try:
      os.rename(path, target)
    except OSError as e:
      raise disk_error(target, e) from None
    moved.append(os.path.basename(target))
  return moved


def _state_file_problem(directory: str) -> Optional[str]:
  path = os.path.join(directory, CHECKPOINT_STATE_FILE)
  if not os.path.exists(path):
    return None
  try:
    state = tf.train.get_checkpoint_state(directory)
  except (tf.errors.OpError, ValueError, UnicodeDecodeError) as e:
    return f"it does not parse ({type(e).__name__})"
  if state is None or not state.model_checkpoint_path:
    return "it names no checkpoint"
  return None


def checkpoint_step(prefix: str) -> int:
  """N of ckpt-N: the outer step training saved it at."""
  return _checkpoint_number(prefix)


def checkpoint_write_error(directory: str, step: int,
                           error: Exception) -> RunDirError:
  """The one-line error of a checkpoint save that failed (e.g. ENOSPC).

  TensorFlow writes a checkpoint under temporary names and renames it into
  place last, and the manager updates its state file only after that, so
  the checkpoints already there stay the newest intact ones.
  """
  if isinstance(error, OSError):
    return disk_error(os.path.join(directory, f"{CHECKPOINT_PREFIX}-{step}"),
                      error)
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  known = [(code, os.strerror(code)) for code in (
      errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)]
  for code, message in known:
    if message.lower() in text.lower():
      return disk_error(os.path.join(directory,
                                     f"{CHECKPOINT_PREFIX}-{step}"),
                        OSError(code, message))
  return RunDirError(
      f"cannot write checkpoint {CHECKPOINT_PREFIX}-{step} in {directory}: "
      f"{text[:200]}; fix the cause and rerun the same command: the run "
      f"resumes from its last intact checkpoint.")


def newest_intact_checkpoint(directory: str, repair: bool = True
                             ) -> Optional[str]:
  """The newest checkpoint of `directory` that reads back and is finite.

  With `repair` (the chief), damaged ones (and a damaged `checkpoint` state
  file) are renamed `*.damaged` with one warning each, and the state file is
  rewritten to list the intact ones, so rotation and later restores never
  count the damaged; without it (other workers, tools) nothing is touched.
  Returns None when the directory holds no checkpoint at all. Raises
  RunDirError, renaming nothing, when it holds some but none is intact.
  """
  if not os.path.isdir(directory):
    return None
  candidates = listed_checkpoints(directory)
  state_problem = _state_file_problem(directory)
  damaged, intact = [], []
  for prefix in candidates:
    problem = check_checkpoint(prefix)
    if problem is None:
      intact.append(prefix)
    else:
      damaged.append((prefix, problem))
  if candidates and not intact:
    names = ", ".join(f"{os.path.basename(p)} ({why})" for p, why in damaged)
    raise RunDirError(
        f"no checkpoint in {directory} can be resumed from: {names}. "
        f"Nothing was changed. Restore them from a copy, or move "
        f"{directory} aside (or pass another --run_name) to start afresh.")
  newest = intact[0] if intact else None
  if not repair:
    return newest
  newer_damaged = [(p, why) for p, why in damaged
                   if newest is None or
                   _checkpoint_number(p) > _checkpoint_number(newest)]
  for prefix, problem in damaged:
    moved = _move_aside(_checkpoint_files(prefix))
    logging.warning("checkpoint %s is damaged (%s): moved aside as %s%s.",
                    prefix, problem, ", ".join(moved),
                    "; resuming from " + os.path.basename(newest)
                    if (prefix, problem) in newer_damaged else "")
  state_path = os.path.join(directory, CHECKPOINT_STATE_FILE)
  if state_problem is not None:
    _move_aside([state_path])
    logging.warning("checkpoint state file %s is damaged (%s): moved aside "
                    "as %s%s.", state_path, state_problem,
                    CHECKPOINT_STATE_FILE + DAMAGED_SUFFIX,
                    "; rebuilt from the checkpoints on disk" if intact
                    else "")
  if intact and (damaged or state_problem is not None):
    _write_state_file(directory, list(reversed(intact)))
  return newest


def _write_state_file(directory: str, prefixes: Sequence[str]):
  """The manager's `checkpoint` file (a CheckpointState text proto) listing
  `prefixes`, oldest first, with their index files' times, so it rotates
  them as its own."""
  lines = [f'model_checkpoint_path: "{os.path.basename(prefixes[-1])}"']
  lines += [f'all_model_checkpoint_paths: "{os.path.basename(p)}"'
            for p in prefixes]
  lines += [f"all_model_checkpoint_timestamps: "
            f"{os.path.getmtime(p + '.index')!r}" for p in prefixes]
  lines.append(f"last_preserved_timestamp: "
               f"{min(os.path.getmtime(p + '.index') for p in prefixes) - 1!r}")
  path = os.path.join(directory, CHECKPOINT_STATE_FILE)
  try:
    with open(path + ".tmp", "w") as f:
      f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
  except OSError as e:
    raise disk_error(path, e) from None


# ----------------------------------------------------- Resume and config.


def config_changes(old: Dict[str, Any], new: Dict[str, Any],
                   may_change: Sequence[str]
                   ) -> Tuple[Dict[str, Tuple], Dict[str, Tuple]]:
  """(allowed, refused) differences old -> new, by field name.

  Fields in `may_change` only extend or observe the run; any other
  difference defines another experiment. A field `old` lacks (written by an
  older version) is compared with nothing: it cannot be told apart.
  """
  allowed, refused = {}, {}
  for name, value in new.items():
    if name not in old or name == CHANGES_KEY:
      continue
    before = old[name]
    if _same(before, value):
      continue
    (allowed if name in may_change else refused)[name] = (before, value)
  return allowed, refused


def _same(a, b) -> bool:
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not (
      isinstance(a, bool) or isinstance(b, bool)):
    return a == b or (math.isnan(a) and math.isnan(b))
  return a == b


def format_changes(changes: Dict[str, Tuple]) -> str:
  """"--lr 0.1 -> 0.05, --epochs 5 -> 10"."""
  return ", ".join(f"--{name} {_flag_value(old)} -> {_flag_value(new)}"
                   for name, (old, new) in sorted(changes.items()))


def _flag_value(value) -> str:
  if isinstance(value, (list, tuple)):
    return ",".join(_flag_value(v) for v in value) or "''"
  if value is None:
    return "unset"
  return str(value)
