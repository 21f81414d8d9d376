"""Tables and plots of runs, grouped over seeds.

    bazel run //launch:results -- --output_dir=results runs/RUN_A runs/RUN_B
    bazel run //launch:results -- --output_dir=results runs   # every run in it

Writes OUTPUT_DIR/results.md, OUTPUT_DIR/results.csv and one PNG per
(dataset, model); see `entropy_sgd.reports.results` for how runs are grouped.
"""

import sys

from absl import app
from absl import flags

from entropy_sgd.reports import results
from entropy_sgd.train import run_dir

_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None,
    "Directory to write results.md, results.csv and the plots to (required).")


def main(argv):
  if not _OUTPUT_DIR.value:
    sys.exit("error: --output_dir is required, e.g. --output_dir=results")
  if len(argv) < 2:
    sys.exit("error: name at least one run directory (or a directory of "
             "runs), e.g. runs/cifar10_wrn-28-10_nesterov_seed0")
  paths = [run_dir.resolve_user_path(path) for path in argv[1:]]
  output_dir = run_dir.resolve_user_path(_OUTPUT_DIR.value)
  try:
    written = results.write_results(paths, output_dir)
  except results.NotARunError as e:
    sys.exit(f"error: {e}")
  except OSError as e:
    sys.exit(f"error: cannot write to --output_dir={output_dir} "
             f"({e.strerror or e})")
  for path in [written.markdown, written.csv] + written.plots:
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
