"""The paper's networks: shapes, parameter counts, dropout and names."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from entropy_sgd import models
from entropy_sgd import wide_resnet


def built(name, shape, **kwargs):
  model = models.build(name, 10, **kwargs)
  model(tf.zeros([2, *shape]), is_training=False)
  return model


# Our counts, by hand from the layer lists: weights without the biases
# that BatchNorm cancels, BatchNorm scale and offset (2 per channel), and
# the logits layer's bias.
OUR_COUNTS = {
    "mnistfc": 784 * 1024 + 1024 * 1024 + 1024 * 10 + 10 + 2 * 2 * 1024,
    "lenet": (25 * 1 * 20 + 25 * 20 * 50 + 200 * 500 + 500 * 10 + 10
              + 2 * (20 + 50 + 500)),
    "allcnn": (9 * 3 * 96 + 2 * 9 * 96 * 96 + 9 * 96 * 192 + 4 * 9 * 192 * 192
               + 192 * 10 + 2 * (3 * 96 + 5 * 192 + 10)),
}
# The reference's layers keep a bias before each BatchNorm.
BIASES_BEFORE_BATCH_NORM = {"mnistfc": 2 * 1024, "lenet": 20 + 50 + 500,
                            "allcnn": 3 * 96 + 5 * 192 + 10}


class ModelTest(parameterized.TestCase):

  @parameterized.parameters(("mnistfc", models.MNIST_SHAPE),
                            ("lenet", models.MNIST_SHAPE),
                            ("allcnn", models.CIFAR_SHAPE))
  def test_parameter_counts(self, name, shape):
    model = built(name, shape)
    self.assertEqual(wide_resnet.num_parameters(model), OUR_COUNTS[name])
    self.assertEqual(
        models.reference_parameter_count(name, input_shape=shape),
        OUR_COUNTS[name] + BIASES_BEFORE_BATCH_NORM[name])

  @parameterized.parameters(("mnistfc", models.MNIST_SHAPE, 2),
                            ("lenet", models.MNIST_SHAPE, 3),
                            ("allcnn", models.CIFAR_SHAPE, 9))
  def test_logits_and_batch_norms(self, name, shape, num_batch_norms):
    model = built(name, shape)
    logits = model(tf.random.normal([4, *shape]), is_training=True)
    self.assertEqual(logits.shape, (4, 10))
    self.assertLen(model.batch_norms, num_batch_norms)

  def test_allcnn_logits_are_non_negative_as_in_the_reference(self):
    model = built("allcnn", models.CIFAR_SHAPE)
    logits = model(tf.random.normal([4, 32, 32, 3]), is_training=True)
    self.assertGreaterEqual(float(tf.reduce_min(logits)), 0.0)

  def test_dropout_is_keyed_by_seed_and_call(self):
    images = tf.random.normal([64, 28, 28, 1], seed=1)

    def outputs(seed, calls):
      tf.random.set_seed(0)  # The same initial weights.
      model = built("mnistfc", models.MNIST_SHAPE, seed=seed)
      return [model(images, is_training=True).numpy() for _ in range(calls)]

    first, second = outputs(0, 2)
    np.testing.assert_array_equal(outputs(0, 1)[0], first)  # Reproducible.
    self.assertFalse(np.allclose(first, second))  # New masks per call.
    self.assertFalse(np.allclose(outputs(1, 1)[0], first))  # Per seed.

  def test_dropout_off_in_evaluation_and_on_request(self):
    model = built("lenet", models.MNIST_SHAPE)
    images = tf.random.normal([8, 28, 28, 1], seed=2)
    np.testing.assert_array_equal(model(images, is_training=False),
                                  model(images, is_training=False))
    calls = int(model.dropout_calls.numpy())
    model(images, is_training=True, use_dropout=False)
    self.assertEqual(int(model.dropout_calls.numpy()), calls)

  def test_dropout_rate(self):
    model = models.MnistFC(input_dropout=0.2, dropout=0.0)
    kept = model._dropout  # pylint: disable=protected-access
    model._begin_call(True, None)  # pylint: disable=protected-access
    values = kept(tf.ones([100_000]), 0.2, True).numpy()
    self.assertAlmostEqual(float(np.mean(values == 0)), 0.2, delta=0.01)
    self.assertAlmostEqual(float(np.mean(values)), 1.0, delta=0.02)

  def test_checks(self):
    with self.assertRaisesRegex(ValueError, "dropout must be in"):
      models.MnistFC(dropout=1.0)
    with self.assertRaisesRegex(ValueError, "rank 4"):
      built("lenet", models.MNIST_SHAPE)(tf.zeros([2, 784]), False)


class NameTest(parameterized.TestCase):

  @parameterized.parameters(("mnistfc", "mnistfc"), ("LeNet", "lenet"),
                            ("allcnn", "allcnn"), ("wrn-16-1", "wrn"),
                            ("WRN-28-10", "wrn"))
  def test_families(self, name, family):
    self.assertEqual(models.model_family(name), family)

  @parameterized.parameters("resnet50", "wrn-27-10", "lenet5")
  def test_unknown_names(self, name):
    with self.assertRaises(ValueError):
      models.model_family(name)

  def test_fit(self):
    models.check_fits("lenet", "mnist")
    models.check_fits("allcnn", "cifar100")
    with self.assertRaisesRegex(ValueError, "built for mnist, not cifar10"):
      models.check_fits("mnistfc", "cifar10")
    with self.assertRaisesRegex(ValueError, "sync_batch_norm"):
      models.build("lenet", 10, cross_replica_batch_norm=True)


if __name__ == "__main__":
  absltest.main()
