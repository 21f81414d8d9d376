"""What a run's config.json holds, and the refusal of a resume under
settings that define another experiment."""

import dataclasses
import os
from typing import Dict, Optional

from absl import logging

from entropy_sgd.core import noise as noise_lib
from entropy_sgd.train import config as config_lib
from entropy_sgd.train import run_dir as run_dir_lib


NOISE_NAMES = {noise_lib.KERNEL: "the compiled kernel",
                noise_lib.TENSORFLOW: "TensorFlow's ops",
                noise_lib.NONE: "nothing (no noise)"}
# The --noise_kernel that resolves to a saved implementation, and where.


_NOISE_CHOICE_OF = {
    noise_lib.KERNEL: "--noise_kernel=on, on a machine where the kernel loads",
    noise_lib.TENSORFLOW: "--noise_kernel=off"}


def _resume_refused(run_dir, refused, noise_reason: str
                    ) -> run_dir_lib.RunDirError:
  """The one-line refusal of a resume under other settings."""
  noise_change = refused.get(config_lib.NOISE_IMPLEMENTATION)
  others = {k: v for k, v in refused.items()
            if k != config_lib.NOISE_IMPLEMENTATION}
  said = []
  if others:
    said.append(f"{run_dir} was trained with other settings: "
                f"{run_dir_lib.format_changes(others)}")
  old_values, accept = "the old values", ""
  if noise_change:
    saved, new = noise_change
    said.append(
        f"{'it' if others else run_dir} drew its Langevin noise with "
        f"{NOISE_NAMES.get(saved, saved)}, but here it would use "
        f"{NOISE_NAMES.get(new, new)} ({noise_reason}), and the two drift "
        f"apart at float round-off")
    if saved in _NOISE_CHOICE_OF:
      old_values += f" ({_NOISE_CHOICE_OF[saved]})"
    accept = " and accept the drift"
  return run_dir_lib.RunDirError(
      f"{'; '.join(said)}. Rerun with {old_values} to resume it, pass "
      f"--allow_config_change to continue it under the new ones{accept} "
      f"(recorded in {run_dir_lib.CONFIG_FILE}), or pass another --run_name "
      f"for a new run.")


def config_record(config, run_dir: str, resume_step: Optional[int],
                   noise_implementation: noise_lib.Implementation) -> Dict:
  """What config.json will hold; refuses a resume under another experiment.

  The record holds the fields of `config` and the resolved
  `noise_implementation` (`config_lib.NOISE_IMPLEMENTATION` and its
  reason). On resume the stored settings are compared with it: fields of
  `config_lib.RESUME_MAY_CHANGE` may differ (logged); any other difference,
  the noise implementation included, is a RunDirError unless
  `config.allow_config_change`, and then it is logged and appended to the
  `config_changes` history with its step. A record from before the noise
  implementation was saved resumes with a warning.
  """
  record = dataclasses.asdict(config)
  record[config_lib.NOISE_IMPLEMENTATION] = noise_implementation.name
  record[config_lib.NOISE_IMPLEMENTATION_REASON] = noise_implementation.reason
  path = os.path.join(run_dir, run_dir_lib.CONFIG_FILE)
  if resume_step is None or not os.path.exists(path):
    return record
  try:
    stored = config_lib.complete_record(run_dir_lib.decode_config(
        run_dir_lib.read_json(path), config_lib.FLOAT_FIELDS))
  except (OSError, ValueError) as e:
    raise run_dir_lib.RunDirError(
        f"cannot read {path} ({e}); restore it or move {run_dir} aside to "
        f"start afresh.") from None
  history = list(stored.get(run_dir_lib.CHANGES_KEY, []))
  if (config_lib.NOISE_IMPLEMENTATION not in stored and
      noise_implementation.name != noise_lib.NONE):
    logging.warning(
        "%s does not record which implementation drew the Langevin noise "
        "so far (written before it was recorded); from outer step %d it is "
        "%s (%s). If earlier starts used the other, the run drifts at "
        "float round-off.", path, resume_step,
        NOISE_NAMES[noise_implementation.name], noise_implementation.reason)
  # The reason explains the record and differs between machines.
  unread = config_lib.unread_fields(record) | {
      config_lib.NOISE_IMPLEMENTATION_REASON}
  allowed, refused = run_dir_lib.config_changes(
      {k: v for k, v in stored.items() if k not in unread},
      {k: v for k, v in record.items() if k not in unread},
      config_lib.RESUME_MAY_CHANGE)
  allowed.pop("allow_config_change", None)  # The override itself.
  if refused and not config.allow_config_change:
    raise _resume_refused(run_dir, refused, noise_implementation.reason)
  if allowed:
    logging.info("Resuming with %s (these only extend or observe the run).",
                 run_dir_lib.format_changes(allowed))
  if refused:
    logging.warning("Resuming at outer step %d under changed settings "
                    "(--allow_config_change): %s; recorded in %s.",
                    resume_step, run_dir_lib.format_changes(refused), path)
  if allowed or refused:
    history.append({"step": resume_step, "overridden": {
        name: list(change) for name, change in sorted(refused.items())},
                    "allowed": {name: list(change) for name, change in
                                sorted(allowed.items())}})
  if history:
    record[run_dir_lib.CHANGES_KEY] = history
  return record
