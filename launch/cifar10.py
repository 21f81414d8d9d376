"""Train a Wide ResNet on CIFAR-10 with SGD, Nesterov or Entropy-SGD.

    bazel run //launch:cifar10 -- --opt=entropy_sgd --L=20
    bazel run //launch:cifar10 -- --help
"""

from entropy_sgd.core import onednn  # First: before anything imports TensorFlow.

onednn.enable_before_tensorflow()

from absl import app

from entropy_sgd.cli import launcher

launcher.define_flags("cifar10")

if __name__ == "__main__":
  app.run(lambda argv: launcher.run("cifar10"))
