"""Flatness diagnostics of a trained run: Hessian spectrum and trace, local
entropy, epsilon-sharpness, filter-normalised directions, interpolation.

    bazel run //launch:landscape -- --run_dir=runs/RUN --output_dir=flat
    bazel run //launch:landscape -- --run_dir=runs/SGD_RUN \\
        --compare=runs/ENTROPY_SGD_RUN --output_dir=flat --batches=20

Reads RUN/config.json and the latest checkpoint in RUN/checkpoints, and
writes OUTPUT_DIR/landscape.json, OUTPUT_DIR/landscape.md and PNG plots
(see `entropy_sgd.reports.landscape`). Every measure is of the mean training
cross-entropy over --batches un-augmented training batches, with BatchNorm
statistics recalibrated at the checkpoint's weights.
"""

from entropy_sgd.core import onednn  # First: before anything imports TensorFlow.

onednn.enable_before_tensorflow()

from absl import app

from entropy_sgd.cli import landscape_tool

landscape_tool.define_flags()

if __name__ == "__main__":
  app.run(lambda argv: landscape_tool.run())
