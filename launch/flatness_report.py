"""Flatness measures against the generalisation gap, over measured runs.

    bazel run //launch:flatness_report -- --output_dir=docs/results/flatness \
        measures/RUN_A measures/RUN_B ...   # or a directory of them

Each input holds config.json, summary.json, flatness/landscape.json and
train/landscape.json (docs/flatness.md: "Measuring every run"). Writes
OUTPUT_DIR/flatness.md, flatness.csv and one scatter plot per measure; see
`entropy_sgd.reports.flatness_report`.
"""

import os
import sys

from absl import app
from absl import flags

from entropy_sgd.reports import flatness_report
from entropy_sgd.train import run_dir

_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Directory for flatness.md, flatness.csv and the "
    "plots (required).")


def _expand(path):
  if os.path.isdir(os.path.join(path, "flatness")):
    return [path]
  children = sorted(os.path.join(path, n) for n in os.listdir(path)) if (
      os.path.isdir(path)) else []
  return [c for c in children if os.path.isdir(os.path.join(c, "flatness"))]


def main(argv):
  if not _OUTPUT_DIR.value:
    sys.exit("error: --output_dir is required, e.g. "
             "--output_dir=docs/results/flatness")
  paths = [p for a in argv[1:] for p in _expand(run_dir.resolve_user_path(a))]
  if not paths:
    sys.exit("error: name at least one measured run (a directory with "
             "flatness/landscape.json), or a directory of them")
  output_dir = run_dir.resolve_user_path(_OUTPUT_DIR.value)
  try:
    written = flatness_report.write_report(paths, output_dir)
  except flatness_report.ReportError as e:
    sys.exit(f"error: {e}")
  except OSError as e:
    sys.exit(f"error: cannot write to --output_dir={output_dir} "
             f"({e.strerror or e})")
  for path in written:
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
