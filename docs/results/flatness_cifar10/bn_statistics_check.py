"""Errors of a CIFAR run's checkpoint on train/validation under three sets of
BatchNorm statistics: the checkpoint's own, recalibrated on un-augmented
training batches, and recalibrated on batches augmented as in training.

    PYTHONPATH=. .venv/bin/python docs/results/flatness_cifar10/bn_statistics_check.py RUN_DIR [DATA_DIR]
"""
import sys

import numpy as np
import tensorflow as tf

from entropy_sgd.core import batch_norm
from entropy_sgd.reports import landscape
from entropy_sgd.train import config as config_lib
from entropy_sgd.workloads import data as data_lib

RECALIBRATION_BATCHES = 351  # One epoch of 45,000 images in batches of 128.
TRAIN_BATCHES = 100

run = sys.argv[1]
config, checkpoint = landscape.read_run(run)
data = data_lib.ImageData(config_lib.pipeline_config(
    config, data_dir=sys.argv[2] if len(sys.argv) > 2 else config.data_dir))
strategy = tf.distribute.get_strategy()
model = landscape.build_and_restore(config, checkpoint, strategy, data,
                                    "--run_dir")
norms = batch_norm.batch_norms(model)


@tf.function
def predictions(images):
  return tf.argmax(model(images, is_training=False), -1, output_type=tf.int32)


@tf.function
def feed(images):
  batch_norm.feed(model, images)


def error(dataset, batches=None):
  wrong = total = 0
  for images, labels in dataset.take(batches or -1):
    wrong += int(np.sum(predictions(images).numpy() != labels.numpy()))
    total += int(labels.shape[0])
  return 100.0 * wrong / total


def report(name):
  print(f"| {name} | {error(data.eval_dataset('validation')):.2f}% | "
        f"{error(data.recalibration_dataset(0), TRAIN_BATCHES):.2f}% |",
        flush=True)


print(f"{run} ({config.opt}, checkpoint {checkpoint})")
print("| BatchNorm statistics | validation error (clean) | training error "
      f"({TRAIN_BATCHES} un-augmented batches) |\n|---|---|---|")
report("the checkpoint's")
for augment in (False, True):
  batch_norm.reset_statistics(norms)
  for images, _ in data.recalibration_dataset(1, augment=augment).take(
      RECALIBRATION_BATCHES):
    feed(images)
  report(f"recalibrated on {RECALIBRATION_BATCHES} "
         f"{'augmented' if augment else 'un-augmented'} training batches")
