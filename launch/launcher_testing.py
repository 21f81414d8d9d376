"""What the launcher tests share: how to start a launcher as a user would."""

import contextlib
import io
import os
import subprocess
import sys
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
TESTDATA = os.path.join(HERE, "..", "testdata")


def launcher_command(dataset):
  """The bazel-built launcher when present, else the source file."""
  built = os.path.join(HERE, dataset)
  if os.path.exists(built):
    return [built]
  return [sys.executable, os.path.join(HERE, dataset + ".py")]


def launcher_env(**overrides):
  """This process's environment, quiet, without TF_CONFIG, plus overrides."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  env.setdefault("PYTHONPATH", os.path.join(HERE, ".."))
  env.pop("TF_CONFIG", None)
  env.update(overrides)
  return env


def run_launcher(dataset, *args, cwd=None, tf_config=None, timeout=600,
                 env=None):
  """Runs launcher `dataset` with `args` to the end; a CompletedProcess.

  `env`: more environment variables for it.
  """
  overrides = {} if tf_config is None else {"TF_CONFIG": tf_config}
  overrides.update(env or {})
  return subprocess.run(
      launcher_command(dataset) + list(args), capture_output=True, text=True,
      timeout=timeout, env=launcher_env(**overrides), cwd=cwd)


def run_in_process(dataset, *args, tf_config=None, env=None):
  """Runs the launcher's `run` in this process; a CompletedProcess.

  The same flag definitions, parsing and `error:` exit as the binary, on a
  fresh set of flags, without the seconds a new process spends importing
  TensorFlow: bad flags, settings, data and TF_CONFIG, and training runs
  whose result, not their process, is under test. What only a process shows
  (absl's own flag errors, exit codes as the shell sees them, signals, the
  oneDNN setting the binary makes before TensorFlow starts) stays with
  `run_launcher`. `returncode` is the SystemExit code (0 without one);
  stdout is what `run` printed; stderr is what it printed there and every
  log record (absl's format, INFO and up) it made.
  """
  # Here, not at the top: tests that only start processes skip TensorFlow.
  from entropy_sgd.cli import launcher  # pylint: disable=g-import-not-at-top
  return _run_captured(
      dataset, args, lambda flag_values: launcher.define_flags(
          dataset, flag_values),
      lambda flag_values: launcher.run(dataset, flag_values), tf_config, env)


def run_landscape_in_process(*args):
  """//launch:landscape's `run` in this process, as `run_in_process`."""
  from entropy_sgd.cli import landscape_tool  # pylint: disable=g-import-not-at-top
  return _run_captured("landscape", args, landscape_tool.define_flags,
                       landscape_tool.run)


def _run_captured(program, args, define_flags, run, tf_config=None, env=None):
  """`define_flags(flag_values)` on fresh flags, parses `args`, then
  `run(flag_values)` with TF_CONFIG, `env`, output and logs captured."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flag_values = flags.FlagValues()
  define_flags(flag_values)
  flag_values([program, *args])
  environ = {"TF_CONFIG": tf_config} if tf_config is not None else {}
  environ.update(env or {})
  stdout, stderr = io.StringIO(), io.StringIO()
  code = 0
  with contextlib.ExitStack() as stack:
    stack.enter_context(_log_lines_into(stderr))
    stack.enter_context(mock.patch.dict(os.environ, environ))
    if tf_config is None:
      os.environ.pop("TF_CONFIG", None)
    stack.enter_context(contextlib.redirect_stdout(stdout))
    stack.enter_context(contextlib.redirect_stderr(stderr))
    try:
      run(flag_values)
    except SystemExit as e:
      code = e.code
  return subprocess.CompletedProcess([program, *args], code, stdout.getvalue(),
                                     stderr.getvalue())


@contextlib.contextmanager
def _log_lines_into(stream):
  """Sends Python logging's INFO and higher records, formatted as absl
  prints them, to `stream` alone (not also to the test's log)."""
  import logging  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  handler = logging.StreamHandler(stream)
  handler.setFormatter(absl_logging.PythonFormatter())
  root, absl_logger = logging.getLogger(), logging.getLogger("absl")
  handlers, level = root.handlers[:], absl_logger.level
  root.handlers[:] = [handler]
  absl_logger.setLevel(min(level or logging.INFO, logging.INFO))
  try:
    yield
  finally:
    root.handlers[:] = handlers
    absl_logger.setLevel(level)


def error_lines(result):
  """The `error:` (and absl flag error) lines of a launcher's stderr."""
  return [line for line in result.stderr.splitlines()
          if line.startswith(("error:", "FATAL Flags parsing error"))]
