"""Benchmark: is the augmented input pipeline at least 2x faster than training?

Measures, in one process, the images/s of the augmented CIFAR training
pipeline alone and of Nesterov training of a Wide ResNet on an in-memory
batch (what the model can consume), and prints their ratio. Target >= 2.

    bazel run //bench:input_pipeline -- --data_dir=../shared/data/cifar10
"""

from entropy_sgd.core import onednn  # First: before anything imports TensorFlow.

onednn.enable_before_tensorflow()

import time

from absl import app
from absl import flags
import tensorflow as tf

from entropy_sgd.core import optimizers
from entropy_sgd.core import train_step as train_step_lib
from entropy_sgd.train import run_dir
from entropy_sgd.workloads import data
from entropy_sgd.workloads import wide_resnet

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Folder holding cifar-10-batches-bin/ (required).")
_MODEL = flags.DEFINE_string("model", "wrn-16-1", "Wide ResNet, wrn-D-K.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_AUGMENT = flags.DEFINE_enum("augment", "flip_crop_rotate", data.AUGMENTATIONS,
                             "Training augmentation to measure.")
_PIPELINE_BATCHES = flags.DEFINE_integer(
    "pipeline_batches", 400, "Batches drawn from the pipeline (> 1 epoch).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 30, "Timed train steps.")

flags.mark_flag_as_required("data_dir")


def pipeline_images_per_second():
  cifar = data.CifarData(data.PipelineConfig(
      dataset="cifar10", data_dir=run_dir.resolve_user_path(_DATA_DIR.value),
      batch_size=_BATCH_SIZE.value, augment=_AUGMENT.value))
  iterator = iter(cifar.train_dataset())
  for _ in range(20):  # Fill the shuffle buffer, warm up.
    next(iterator)
  start = time.perf_counter()
  for _ in range(_PIPELINE_BATCHES.value):
    images, _ = next(iterator)
  images.numpy()
  return _PIPELINE_BATCHES.value * _BATCH_SIZE.value / (
      time.perf_counter() - start)


def training_images_per_second():
  depth, width = wide_resnet.parse_model_name(_MODEL.value)
  strategy = tf.distribute.get_strategy()
  model = train_step_lib.build_model(
      strategy, lambda: wide_resnet.WideResNet(depth, width, 10), [32, 32, 3])
  images = tf.random.stateless_normal([_BATCH_SIZE.value, 32, 32, 3], [1, 2])
  labels = tf.zeros([_BATCH_SIZE.value], tf.int32)
  iterator = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())
  step = train_step_lib.make_train_step(
      model, optimizers.SGD(0.1, momentum=0.9, nesterov=True,
                            weight_decay=5e-4),
      strategy, _BATCH_SIZE.value)
  for _ in range(3):
    float(step(iterator)["loss"])
  start = time.perf_counter()
  for _ in range(_TRAIN_STEPS.value):
    metrics = step(iterator)
  float(metrics["loss"])
  return _TRAIN_STEPS.value * _BATCH_SIZE.value / (time.perf_counter() - start)


def main(argv):
  del argv
  pipeline = pipeline_images_per_second()
  model = training_images_per_second()
  print(f"augment={_AUGMENT.value}, batch {_BATCH_SIZE.value}: input pipeline "
        f"{pipeline:.0f} images/s, {_MODEL.value} Nesterov training "
        f"{model:.0f} images/s; ratio pipeline/training = "
        f"{pipeline / model:.2f} "
        f"({'meets' if pipeline / model >= 2 else 'misses'} the 2x target)")


if __name__ == "__main__":
  app.run(main)
