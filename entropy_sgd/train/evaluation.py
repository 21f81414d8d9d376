"""Loss and accuracy of a run's model over a split, summed over replicas and
workers, and the BatchNorm recalibration that may precede them."""

from typing import Dict

import tensorflow as tf

from entropy_sgd.core import batch_norm
from entropy_sgd.core import train_step as train_step_lib


class Evaluator:
  """Loss and accuracy over a split, with optional BatchNorm recalibration."""

  def __init__(self, model, strategy, dataset, config):
    self._model, self._strategy = model, strategy
    self._dataset = dataset
    self._config = config

    def replica_eval(images, labels, mask):
      logits = model(images, is_training=False)
      loss = train_step_lib.classification_loss(logits, labels)
      correct = tf.cast(tf.equal(
          tf.argmax(logits, -1, output_type=labels.dtype), labels), tf.float32)
      return tf.stack([tf.reduce_sum(loss * mask),
                       tf.reduce_sum(correct * mask), tf.reduce_sum(mask)])

    if config.jit:  # Evaluation has no all-reduce inside the replica.
      replica_eval = tf.function(replica_eval, jit_compile=True)

    @tf.function
    def evaluate(iterator, num_batches):
      totals = tf.zeros([3])
      for _ in tf.range(num_batches):
        per_replica = strategy.run(replica_eval, args=next(iterator))
        totals += strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica,
                                  None)
      return totals

    self._evaluate = evaluate
    norms = batch_norm.batch_norms(model)

    @tf.function
    def recalibrate(iterator, num_batches):
      strategy.run(lambda: batch_norm.reset_statistics(norms))
      for _ in tf.range(num_batches):
        images, _ = next(iterator)
        strategy.run(lambda x: batch_norm.feed(model, x), args=(images,))

    self._recalibrate = recalibrate if norms else None

  def recalibrate_batch_norm(self, epoch: int):
    """Recomputes BatchNorm statistics at the current weights (x, not x').

    Like the reference code's "dry feed": forward passes in training mode on
    training batches (augmented as in training unless
    `recalibration_augment` is off), with no parameter update.
    """
    if self._recalibrate is None:
      return
    iterator = iter(self._strategy.distribute_datasets_from_function(
        lambda context: self._dataset.recalibration_dataset(
            epoch, context, augment=self._config.recalibration_augment)))
    self._recalibrate(iterator,
                      tf.constant(self._config.recalibration_batches))

  def evaluate(self, split: str) -> Dict[str, float]:
    """Loss and accuracy over `split`, summed over all replicas and workers.

    Every pipeline yields the same number of full, padded batches (see
    `CifarData.eval_dataset`); the padding is masked out of the sums.
    """
    iterator = iter(self._strategy.distribute_datasets_from_function(
        lambda context: self._dataset.eval_dataset(split, context, pad=True)))
    loss, correct, count = self._evaluate(
        iterator, tf.constant(self._dataset.padded_eval_batches(split))
    ).numpy()
    return {"loss": float(loss / count), "accuracy": float(correct / count)}
