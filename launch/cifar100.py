"""Train a Wide ResNet on CIFAR-100 with SGD, Nesterov or Entropy-SGD.

    bazel run //launch:cifar100 -- --opt=entropy_sgd --L=20
    bazel run //launch:cifar100 -- --help
"""

from entropy_sgd.core import onednn  # First: before anything imports TensorFlow.

onednn.enable_before_tensorflow()

from absl import app

from entropy_sgd.cli import launcher

launcher.define_flags("cifar100")

if __name__ == "__main__":
  app.run(lambda argv: launcher.run("cifar100"))
