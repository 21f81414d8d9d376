"""What the launcher tests share: how to start a launcher as a user would."""

import os
import subprocess
import sys

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


def error_lines(result):
  """The `error:` (and absl flag error) lines of a launcher's stderr."""
  return [line for line in result.stderr.splitlines()
          if line.startswith(("error:", "FATAL Flags parsing error"))]
