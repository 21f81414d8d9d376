"""The paper's networks: shapes, parameter counts, dropout and names."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import sonnet as snt
import tensorflow as tf

from entropy_sgd.workloads import models
from entropy_sgd.workloads import wide_resnet


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


def logits_and_gradients(model, images, labels):
  """Training-mode logits (dropout off) and the loss gradients."""
  kwargs = {} if isinstance(model, wide_resnet.WideResNet) else {
      "use_dropout": False}
  with tf.GradientTape() as tape:
    logits = model(images, is_training=True, **kwargs)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels, logits))
  return logits, tape.gradient(loss, model.trainable_variables)


def relative_error(actual, expected):
  return float(tf.norm(actual - expected) / tf.norm(expected))


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

  @parameterized.product(
      (dict(name="mnistfc", shape=models.MNIST_SHAPE),
       dict(name="lenet", shape=models.MNIST_SHAPE),
       dict(name="allcnn", shape=models.CIFAR_SHAPE),
       dict(name="wrn-10-1", shape=models.CIFAR_SHAPE)),
      compute_dtype=(tf.bfloat16, tf.float16))
  def test_16_bit_compute_tracks_float32(self, name, shape, compute_dtype):
    # Same float32 variables, 16-bit compute: variables and BatchNorm
    # statistics stay float32, logits come back float32, and logits and
    # gradients agree with float32 compute (bfloat16 keeps 8 bits of
    # mantissa, float16 11). Relative errors observed at initialisation
    # (batch 8): logits <= 1.4% (bfloat16) and 0.2% (float16); gradients
    # up to 25% and 7.2% (All-CNN's first layer; batch 16 gave 1.6%, 0.3%,
    # 27% and 8% at twice the cost: TensorFlow's float16 filter gradient on
    # CPUs is slow, 73 s for All-CNN at batch 16), growing towards the input:
    # each BatchNorm's backward pass subtracts the batch mean of the
    # incoming gradient, which cancels most of it and leaves its rounding.
    # That is far below minibatch noise, but the bounds are loose.
    reference = built(name, shape)
    mixed = built(name, shape, compute_dtype=compute_dtype)
    for source, target in zip(reference.variables, mixed.variables):
      value = source.numpy()
      if "logits" in source.name and not value.any():  # WRN: zero-init.
        value = np.random.RandomState(0).normal(size=value.shape) * 0.1
        source.assign(value)
      target.assign(value)
    images = tf.random.stateless_normal([8, *shape], [1, 2])
    labels = tf.random.stateless_uniform([8], [3, 4], maxval=10,
                                         dtype=tf.int32)
    logits, gradients = logits_and_gradients(reference, images, labels)
    mixed_logits, mixed_gradients = logits_and_gradients(mixed, images,
                                                         labels)
    self.assertEqual(mixed_logits.dtype, tf.float32)
    self.assertEqual({v.dtype for v in mixed.variables if v.dtype.is_floating},
                     {tf.float32})
    self.assertEqual({g.dtype for g in mixed_gradients}, {tf.float32})
    bfloat16 = compute_dtype == tf.bfloat16
    self.assertLess(relative_error(mixed_logits, logits),
                    0.05 if bfloat16 else 0.01)
    flat = tf.concat([tf.reshape(g, [-1]) for g in gradients], 0)
    mixed_flat = tf.concat([tf.reshape(g, [-1]) for g in mixed_gradients], 0)
    self.assertLess(relative_error(mixed_flat, flat),
                    0.4 if bfloat16 else 0.15)
    batch_norms = [m for m in mixed.submodules if isinstance(m, snt.BatchNorm)]
    self.assertNotEmpty(batch_norms)
    for bn in batch_norms:
      for statistic in (bn.moving_mean.average, bn.moving_variance.average):
        self.assertEqual(statistic.dtype, tf.float32)
        self.assertTrue(np.all(np.isfinite(statistic.numpy())))

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
    # A pixel the input dropout drops gets no gradient; the rest do.
    model = models.MnistFC(input_dropout=0.2, dropout=0.0)
    images = tf.ones([128, 28, 28, 1])
    with tf.GradientTape() as tape:
      tape.watch(images)
      first_logit = tf.reduce_sum(model(images, is_training=True)[:, 0])
    gradient = tape.gradient(first_logit, images).numpy()
    self.assertAlmostEqual(float(np.mean(gradient == 0)), 0.2, delta=0.01)

  def test_checks(self):
    with self.assertRaisesRegex(ValueError, "dropout must be in"):
      models.MnistFC(dropout=1.0)
    with self.assertRaisesRegex(ValueError, "rank 4"):
      built("lenet", models.MNIST_SHAPE)(tf.zeros([2, 784]), False)


# The paper-era nets keep every bias (models.lua at 9564f29), so our count
# is the reference's, by hand from the layer lists.
ICLR17_COUNTS = {
    "mnistfc-iclr17": (784 * 1024 + 1024) + (1024 * 1024 + 1024)
                      + (1024 * 10 + 10),
    "lenet-iclr17": (25 * 1 * 20 + 20) + 2 * 20 + (25 * 20 * 50 + 50)
                    + 2 * 50 + (200 * 500 + 500) + (500 * 10 + 10),
}


def numpy_lenet_iclr17(variables, images):
  """Inference-mode LeNet in the Lua layer order, from the variables alone.

  conv -> ReLU -> max-pool -> BN (moving statistics) twice, fc 500 -> ReLU,
  fc 10; no dropout at inference.
  """
  v = {var.name.split("/", 1)[1].split(":")[0]: var.numpy().astype(np.float64)
       for var in variables}

  def conv_valid(x, w, b):  # x [n, h, w, c], w [k, k, c, o].
    k = w.shape[0]
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))
    return np.einsum("nhwcij,ijco->nhwo", windows, w) + b

  def max_pool(x, size):
    n, h, w, c = x.shape
    h, w = h // size, w // size
    return x[:, :h * size, :w * size].reshape(
        n, h, size, w, size, c).max(axis=(2, 4))

  def batch_norm(x, prefix):
    return ((x - v[f"{prefix}/moving_mean/average"].ravel()) /
            np.sqrt(v[f"{prefix}/moving_variance/average"].ravel() + 1e-5)
            * v[f"{prefix}/scale"].ravel() + v[f"{prefix}/offset"].ravel())

  net = images.astype(np.float64)
  for i, pool in ((1, 3), (2, 2)):
    net = conv_valid(net, v[f"conv{i}/w"], v[f"conv{i}/b"])
    net = batch_norm(max_pool(np.maximum(net, 0), pool), f"pool{i}_bn")
  net = net.reshape(len(net), -1)
  net = np.maximum(net @ v["hidden/w"] + v["hidden/b"], 0)
  return net @ v["logits/w"] + v["logits/b"]


class PaperEraNetTest(parameterized.TestCase):

  @parameterized.parameters("mnistfc-iclr17", "lenet-iclr17")
  def test_parameter_counts(self, name):
    model = built(name, models.MNIST_SHAPE)
    self.assertEqual(wide_resnet.num_parameters(model), ICLR17_COUNTS[name])
    self.assertEqual(models.reference_parameter_count(name),
                     ICLR17_COUNTS[name])

  def test_mnistfc_iclr17_has_no_batch_norm_and_no_input_dropout(self):
    model = built("mnistfc-iclr17", models.MNIST_SHAPE, dropout=0.0)
    self.assertEmpty(model.batch_norms)
    # With dropout 0 training and inference agree: nothing else is random.
    images = tf.random.normal([3, *models.MNIST_SHAPE], seed=1)
    np.testing.assert_allclose(model(images, is_training=True),
                               model(images, is_training=False), rtol=1e-6)

  def test_lenet_iclr17_layer_order_matches_numpy(self):
    model = built("lenet-iclr17", models.MNIST_SHAPE)
    self.assertLen(model.batch_norms, 2)
    rng = np.random.default_rng(0)
    for bn in model.batch_norms:  # Non-trivial statistics and affine terms.
      stats, affine = bn.moving_mean.average.shape, bn.offset.shape
      bn.moving_mean.average.assign(rng.normal(size=stats))
      bn.moving_variance.average.assign(rng.uniform(0.5, 2.0, stats))
      bn.offset.assign(rng.normal(size=affine))
    images = rng.normal(size=[3, *models.MNIST_SHAPE]).astype(np.float32)
    np.testing.assert_allclose(
        model(images, is_training=False).numpy(),
        numpy_lenet_iclr17(model.variables, images), rtol=1e-4, atol=1e-4)

  def test_lenet_differs_from_lenet_iclr17(self):
    # Same data, same variables shapes where they overlap, different graph:
    # BN before ReLU and on fc 500 in today's net.
    ours = built("lenet", models.MNIST_SHAPE)
    self.assertLen(ours.batch_norms, 3)
    self.assertLen(built("lenet-iclr17", models.MNIST_SHAPE).batch_norms, 2)


class InitialisationTest(parameterized.TestCase):

  @parameterized.parameters("mnistfc-iclr17", "lenet-iclr17", "lenet",
                            "mnistfc")
  def test_torch_default_moments(self, name):
    # U(-b, b) with b = 1/sqrt(fan_in): mean 0, variance b^2/3, |w| <= b;
    # biases the same; BatchNorm scale U(0, 1): mean 1/2, variance 1/12.
    tf.random.set_seed(0)
    model = built(name, models.MNIST_SHAPE, init="torch")
    for variable in model.trainable_variables:
      values = variable.numpy().astype(np.float64).ravel()
      leaf = variable.name.split("/")[-1].split(":")[0]
      layer = variable.name.split("/")[-2]
      if leaf == "scale":
        self.assertGreaterEqual(values.min(), 0.0)
        self.assertLessEqual(values.max(), 1.0)
        self.assertAlmostEqual(values.mean(), 0.5, delta=4 * (1 / 12 / len(
            values))**0.5)
        continue
      if leaf == "offset":
        np.testing.assert_array_equal(values, 0.0)
        continue
      weights = dict((v.name.split("/")[-2], v) for v in
                     model.trainable_variables
                     if v.name.split("/")[-1].startswith("w"))[layer]
      fan_in = int(np.prod(weights.shape[:-1]))
      bound = fan_in**-0.5
      self.assertLessEqual(np.abs(values).max(), bound, variable.name)
      if len(values) >= 1000:  # Moments within 5 standard errors.
        self.assertAlmostEqual(values.mean(), 0.0,
                               delta=5 * bound / (3 * len(values))**0.5)
        self.assertAlmostEqual(values.var() / (bound**2 / 3), 1.0,
                               delta=5 * (0.8 / len(values))**0.5)

  def test_he_is_the_default_of_todays_nets(self):
    tf.random.set_seed(0)
    he = built("lenet", models.MNIST_SHAPE, init="he")
    tf.random.set_seed(0)
    default = built("lenet", models.MNIST_SHAPE)
    for a, b in zip(he.variables, default.variables):
      np.testing.assert_array_equal(a.numpy(), b.numpy())
    self.assertEqual(models.spec("lenet-iclr17").default_init, "torch")

  def test_unknown_init(self):
    with self.assertRaisesRegex(ValueError, "init must be one of"):
      models.build("lenet", 10, init="xavier")
    with self.assertRaisesRegex(ValueError, "paper's nets"):
      models.build("wrn-10-1", 10, init="torch")


class NameTest(parameterized.TestCase):

  @parameterized.parameters(("mnistfc", "mnistfc"), ("LeNet", "lenet"),
                            ("mnistfc-iclr17", "mnistfc"),
                            ("lenet-iclr17", "lenet"),
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
