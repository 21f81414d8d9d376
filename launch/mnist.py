"""Train the paper's MNIST nets (mnistfc, LeNet) with SGD, Nesterov or
Entropy-SGD.

    bazel run //launch:mnist -- --opt=entropy_sgd --model=mnistfc
    bazel run //launch:mnist -- --opt=nesterov --data_dir=../shared/data/mnist
    bazel run //launch:mnist -- --help
"""

from entropy_sgd.core import onednn  # First: before anything imports TensorFlow.

onednn.enable_before_tensorflow()

from absl import app

from entropy_sgd.cli import launcher

launcher.define_flags("mnist")

if __name__ == "__main__":
  app.run(lambda argv: launcher.run("mnist"))
