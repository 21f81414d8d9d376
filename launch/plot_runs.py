"""Plots runs side by side: accuracy and loss against effective epochs.

    bazel run //launch:plot_runs -- --output=curves.png runs/RUN_A runs/RUN_B
"""

from absl import app
from absl import flags

from entropy_sgd.reports import plotting
from entropy_sgd.train import run_dir

_OUTPUT = flags.DEFINE_string("output", "curves.png", "PNG file to write.")
_TAGS = flags.DEFINE_list("tags", ["test/accuracy", "train/loss"],
                          "Scalars to plot, one panel each.")


def main(argv):
  run_dirs = [run_dir.resolve_user_path(d) for d in argv[1:]]
  if not run_dirs:
    raise app.UsageError("Name at least one run directory.")
  try:
    path = plotting.plot_runs(run_dirs, run_dir.resolve_user_path(
        _OUTPUT.value), _TAGS.value)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
