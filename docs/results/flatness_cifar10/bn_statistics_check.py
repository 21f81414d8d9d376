"""Errors of a CIFAR run's checkpoint on train/validation, with the trained BN
statistics and after recalibration on un-augmented training batches."""
import sys
import numpy as np, tensorflow as tf
from entropy_sgd.reports import landscape
from entropy_sgd.workloads import data as data_lib
from entropy_sgd.core import batch_norm
run = sys.argv[1]
config, ckpt = landscape.read_run(run)
strategy = tf.distribute.get_strategy()
data = data_lib.ImageData(data_lib.PipelineConfig(dataset=config.dataset, data_dir=sys.argv[2], batch_size=128,
    validation_examples=config.validation_examples, augment="none", seed=config.seed))
model = landscape._build_and_restore(config, ckpt, strategy, data, "--run_dir")
@tf.function
def logits(x): return model(x, is_training=False)
def err(ds, n=None):
  wrong = total = 0
  for i, (x, y) in enumerate(ds):
    if n and i >= n: break
    p = tf.argmax(logits(x), -1, output_type=tf.int32).numpy()
    wrong += int(np.sum(p != y.numpy())); total += len(p)
  return wrong / total
train = lambda: data.recalibration_dataset(0)
print("trained stats: validation", err(data.eval_dataset("validation")), "train(100 batches)", err(train(), 100), flush=True)
norms = batch_norm.batch_norms(model)
@tf.function
def feed(x): batch_norm.feed(model, x)
batch_norm.reset_statistics(norms)
for i, (x, y) in enumerate(train()):
  if i >= 351: break
  feed(x)
print("recalibrated (clean train, 351 batches): validation", err(data.eval_dataset("validation")), "train(100 batches)", err(train(), 100), flush=True)
