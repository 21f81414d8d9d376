"""Resetting and refeeding BatchNorm statistics."""

import numpy as np
import sonnet as snt
import tensorflow as tf

from entropy_sgd.core import batch_norm


class Net(snt.Module):
  """BatchNorm then dropout; records whether dropout was asked for."""

  def __init__(self):
    super().__init__()
    self.bn = snt.BatchNorm(create_scale=False, create_offset=False,
                            decay_rate=0.0)
    self.dropout_requests = []

  def __call__(self, images, is_training, use_dropout=None):
    self.dropout_requests.append(use_dropout)
    return self.bn(images, is_training=is_training)


class BatchNormTest(tf.test.TestCase):

  def test_feed_sets_the_statistics_of_the_batch_without_dropout(self):
    net = Net()
    images = tf.constant(np.random.default_rng(0).normal(
        3.0, 2.0, size=(64, 4)), tf.float32)
    net(images, is_training=True)
    norms = batch_norm.batch_norms(net)
    self.assertEqual(norms, [net.bn])
    batch_norm.reset_statistics(norms)
    self.assertAllEqual(net.bn.moving_mean.value, tf.zeros([1, 4]))
    batch_norm.feed(net, images)
    # decay 0: the moving averages are this batch's statistics.
    self.assertAllClose(net.bn.moving_mean.value,
                        tf.reduce_mean(images, axis=0, keepdims=True),
                        atol=1e-5)
    self.assertIs(net.dropout_requests[-1], False)


if __name__ == "__main__":
  tf.test.main()
