"""Tests for entropy_sgd.workloads.wide_resnet."""

import functools

from absl.testing import parameterized
import sonnet as snt
import tensorflow as tf

from entropy_sgd.core import distribution
from entropy_sgd.workloads import wide_resnet

_NUM_LOGICAL_CPUS = 2


def setUpModule():
  # The MirroredStrategy test needs two devices; it skips if TF started.
  distribution.logical_cpus(_NUM_LOGICAL_CPUS)


@functools.lru_cache(maxsize=None)
def _mirrored_strategy():
  """One MirroredStrategy for the module: strategies created one after the
  other on the same devices may reuse collective instance keys."""
  devices = tf.config.list_logical_devices("CPU")[:_NUM_LOGICAL_CPUS]
  return tf.distribute.MirroredStrategy([d.name for d in devices])


def _closed_form_parameter_count(depth, width, num_classes):
  """Trainable scalars of WRN-depth-width, derived independently of the model.

  Per group with input channels c_in and output channels c (2n 3x3 convs):
  3x3 kernels 9*(c_in*c + (2n-1)*c^2), BN scale+offset 2*(c_in + (2n-1)*c),
  plus a c_in*c projection when the first block changes channels or stride.
  """
  n = (depth - 4) // 6
  k = width
  stem = 3 * 3 * 3 * 16
  total = stem
  group_io = [(16, 16 * k, 1), (16 * k, 32 * k, 2), (32 * k, 64 * k, 2)]
  for c_in, c, stride in group_io:
    total += 9 * (c_in * c + (2 * n - 1) * c * c)
    total += 2 * (c_in + (2 * n - 1) * c)
    if c_in != c or stride != 1:
      total += c_in * c
  final_channels = 64 * k
  total += 2 * final_channels  # Final BN.
  total += final_channels * num_classes + num_classes  # Logits.
  return total


def _images(batch, seed=0, size=32):
  return tf.random.stateless_normal([batch, size, size, 3], seed=[seed, 1])


def _randomize_logits_layer(model, seed=0):
  """Makes logits depend on the features (they are zero-initialised)."""
  weights = model.logits_layer.w
  weights.assign(tf.random.stateless_normal(weights.shape, seed=[seed, 2]))


def _moving_statistics(model):
  return [
      tf.identity(stat) for bn in model.batch_norms
      for stat in (bn.moving_mean.value, bn.moving_variance.value)
  ]


class ParseModelNameTest(parameterized.TestCase):

  @parameterized.parameters(
      ("wrn-28-10", (28, 10)),
      ("WRN-16-1", (16, 1)),
      (" Wrn-40-4 ", (40, 4)),
  )
  def test_valid(self, name, expected):
    self.assertEqual(wide_resnet.parse_model_name(name), expected)

  @parameterized.parameters("wrn-28", "resnet-28-10", "wrn-28-10-1", "wrn-a-b",
                            "", "wrn--28-10")
  def test_malformed(self, name):
    with self.assertRaisesRegex(ValueError, "wrn-<depth>-<width>"):
      wide_resnet.parse_model_name(name)

  def test_bad_depth(self):
    with self.assertRaisesRegex(ValueError, r"6n\+4 .*got 27$"):
      wide_resnet.parse_model_name("wrn-27-10")

  def test_bad_width(self):
    with self.assertRaisesRegex(ValueError, "width must be >= 1"):
      wide_resnet.parse_model_name("wrn-28-0")


class WideResNetTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      # Published sizes from Zagoruyko & Komodakis (2016), Table 1/4.
      ("wrn_28_10", 28, 10, 36.5e6),
      ("wrn_16_1", 16, 1, None),
      ("wrn_16_4", 16, 4, 2.7e6),
      ("wrn_10_2", 10, 2, None),
      ("wrn_40_4", 40, 4, 8.9e6),
  )
  def test_parameter_count(self, depth, width, published):
    model = wide_resnet.WideResNet(depth, width, num_classes=10)
    with self.assertRaisesRegex(ValueError, "does not currently contain"):
      wide_resnet.num_parameters(model)  # Variables are not built yet.
    # Parameter count does not depend on spatial size; 8x8 keeps this fast.
    model(_images(1, size=8), is_training=True)
    count = wide_resnet.num_parameters(model)
    self.assertEqual(count, _closed_form_parameter_count(depth, width, 10))
    if published is not None:
      self.assertAlmostEqual(count, published, delta=0.05e6)
    if (depth, width) == (28, 10):
      self.assertBetween(count, 36.4e6, 36.6e6)
      self.assertEqual(count, 36_479_194)

  @parameterized.parameters(27, 9, 4, 0, -2, 29, 28.0)
  def test_invalid_depth(self, depth):
    with self.assertRaisesRegex(
        ValueError, rf"^WideResNet depth must be 6n\+4 .*; got {depth}$"):
      wide_resnet.WideResNet(depth, 2, 10)

  @parameterized.named_parameters(
      ("zero_width", dict(width=0), "width"),
      ("float_width", dict(width=2.0), "width"),
      ("zero_classes", dict(num_classes=0), "num_classes"),
      ("dropout_one", dict(dropout_rate=1.0), "dropout_rate"),
      ("negative_dropout", dict(dropout_rate=-0.1), "dropout_rate"),
      ("bn_decay_one", dict(bn_decay_rate=1.0), "bn_decay_rate"),
      ("zero_eps", dict(bn_eps=0.0), "bn_eps"),
  )
  def test_invalid_arguments(self, overrides, message):
    kwargs = dict(depth=10, width=1, num_classes=10)
    kwargs.update(overrides)
    with self.assertRaisesRegex(ValueError, message):
      wide_resnet.WideResNet(**kwargs)

  def test_rejects_non_image_input(self):
    model = wide_resnet.WideResNet(10, 1, 10)
    with self.assertRaisesRegex(ValueError, "rank 4"):
      model(tf.zeros([2, 32, 32]), is_training=True)

  def test_initial_logits_are_zero(self):
    model = wide_resnet.WideResNet(10, 2, num_classes=7)
    images = _images(3)
    train_logits = model(images, is_training=True)
    eval_logits = model(images, is_training=False)
    self.assertEqual(train_logits.shape, [3, 7])
    self.assertEqual(eval_logits.shape, [3, 7])
    self.assertAllEqual(train_logits, tf.zeros([3, 7]))
    self.assertAllEqual(eval_logits, tf.zeros([3, 7]))

  def test_moving_statistics_update_only_in_training(self):
    model = wide_resnet.WideResNet(10, 1, 10)
    images = _images(4)
    model(images, is_training=True)
    # Debiased EMA: after one update the moving mean is the batch mean.
    first_bn = model.batch_norms[0]
    stem_mean = tf.reduce_mean(model.stem(images), axis=[0, 1, 2])
    self.assertAllClose(
        tf.reshape(first_bn.moving_mean.value, [-1]), stem_mean, atol=1e-5)

    before_eval = _moving_statistics(model)
    model(_images(4, seed=1), is_training=False)
    for before, after in zip(before_eval, _moving_statistics(model)):
      self.assertAllEqual(before, after)

    model(_images(4, seed=2), is_training=True)
    for before, after in zip(before_eval, _moving_statistics(model)):
      self.assertNotAllClose(before, after)

  def test_eval_uses_moving_statistics(self):
    model = wide_resnet.WideResNet(10, 1, 10)
    images = _images(4)
    model(images, is_training=True)
    _randomize_logits_layer(model)

    # Eval: each example's logits are independent of the rest of the batch.
    self.assertAllClose(
        model(images, is_training=False)[:1],
        model(images[:1], is_training=False),
        atol=1e-5)
    # Training: batch statistics couple examples within the batch.
    other_batch = tf.concat([images[:1], _images(3, seed=3)], axis=0)
    self.assertNotAllClose(
        model(images, is_training=True)[:1],
        model(other_batch, is_training=True)[:1])

  def test_dropout_only_in_training(self):
    model = wide_resnet.WideResNet(10, 1, 10, dropout_rate=0.5)
    images = _images(2)
    model(images, is_training=True)
    _randomize_logits_layer(model)
    self.assertNotAllClose(
        model(images, is_training=True), model(images, is_training=True))
    self.assertAllEqual(
        model(images, is_training=False), model(images, is_training=False))

    no_dropout = wide_resnet.WideResNet(10, 1, 10, dropout_rate=0.0)
    no_dropout(images, is_training=True)
    _randomize_logits_layer(no_dropout)
    self.assertAllEqual(
        no_dropout(images, is_training=True),
        no_dropout(images, is_training=True))

  def test_dropout_is_keyed_and_resume_exact(self):
    images = _images(2)

    def build(seed):
      model = wide_resnet.WideResNet(10, 1, 10, dropout_rate=0.5, seed=seed)
      model(images, is_training=False)
      return model

    model, resumed, other_seed = build(0), build(0), build(1)
    for m in (resumed, other_seed):
      for mine, theirs in zip(m.variables, model.variables):
        mine.assign(theirs)  # Same weights; dropout_calls = 0 everywhere.
    _randomize_logits_layer(model)
    for m in (resumed, other_seed):
      m.logits_layer.w.assign(model.logits_layer.w)
    first = model(images, is_training=True)
    second = model(images, is_training=True)
    self.assertEqual(int(model.dropout_calls.numpy()), 2)
    self.assertNotAllClose(first, second)
    # A model restored after the first call (its counter included) draws the
    # masks of the second call, as a stateful dropout would not.
    resumed.dropout_calls.assign(1)
    self.assertAllClose(resumed(images, is_training=True), second)
    self.assertNotAllClose(other_seed(images, is_training=True), first)
    # use_dropout=False in training mode (BatchNorm recalibration) draws
    # nothing and does not count.
    calls = int(model.dropout_calls.numpy())
    no_drop = model(images, is_training=True, use_dropout=False)
    self.assertAllClose(no_drop, model(images, is_training=True,
                                       use_dropout=False))
    self.assertEqual(int(model.dropout_calls.numpy()), calls)

  def test_no_dropout_keeps_the_checkpoint_layout(self):
    model = wide_resnet.WideResNet(10, 1, 10, dropout_rate=0.0)
    model(_images(2), is_training=True)
    self.assertFalse(hasattr(model, "dropout_calls"))
    self.assertNotIn("dropout_calls",
                     " ".join(v.name for v in model.variables))

  @parameterized.parameters(
      # width 1: group 1 is 16 -> 16 (identity); groups 2 and 3 project.
      (1, ["group2_block1", "group3_block1"]),
      (2, ["group1_block1", "group2_block1", "group3_block1"]),
  )
  def test_projection_shortcuts(self, width, expected_projected_blocks):
    model = wide_resnet.WideResNet(16, width, 10)  # 2 blocks per group.
    model(_images(1, size=8), is_training=True)
    one_by_one_convs = [
        m for m in model.submodules
        if isinstance(m, snt.Conv2D) and m.w.shape[:2] == (1, 1)
    ]
    self.assertLen(one_by_one_convs, len(expected_projected_blocks))
    projected = [b.name for b in model.blocks if b.projection is not None]
    self.assertEqual(projected, expected_projected_blocks)
    for block in model.blocks:
      if block.projection is not None:
        self.assertEqual(block.projection.w.shape,
                         (1, 1, block.in_channels, block.out_channels))
        self.assertEqual(block.projection.stride, block.stride)

  def test_shortcut_inputs(self):
    model = wide_resnet.WideResNet(16, 2, 10)
    model(_images(2, size=8), is_training=True)
    projected_block, identity_block = model.blocks[:2]  # Group 1, 16 -> 32.
    for block in (projected_block, identity_block):
      for conv in block.submodules:
        if isinstance(conv, snt.Conv2D) and conv.w.shape[:2] == (3, 3):
          conv.w.assign(tf.zeros_like(conv.w))  # Leaves only the shortcut.

    inputs = tf.random.stateless_normal([2, 8, 8, 16], seed=[5, 5])
    mean, variance = tf.nn.moments(inputs, axes=[0, 1, 2])
    preactivated = tf.nn.relu((inputs - mean) * tf.math.rsqrt(variance + 1e-5))
    self.assertAllClose(
        projected_block(inputs, is_training=True),
        projected_block.projection(preactivated),
        atol=1e-4)
    wide_inputs = tf.random.stateless_normal([2, 8, 8, 32], seed=[6, 6])
    self.assertAllEqual(
        identity_block(wide_inputs, is_training=True), wide_inputs)

  def test_xla_matches_eager(self):
    model = wide_resnet.WideResNet(10, 1, 10)
    images = _images(2)
    labels = tf.constant([3, 7])
    model(images, is_training=True)
    _randomize_logits_layer(model)

    def train_step(images):
      with tf.GradientTape() as tape:
        logits = model(images, is_training=True)
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
      return logits, tape.gradient(loss, model.trainable_variables)

    def eval_step(images):
      return model(images, is_training=False)

    xla_train_step = tf.function(train_step, jit_compile=True)
    xla_eval_step = tf.function(eval_step, jit_compile=True)

    self.assertAllClose(
        eval_step(images), xla_eval_step(images), rtol=1e-5, atol=1e-5)
    eager_logits, eager_grads = train_step(images)
    xla_logits, xla_grads = xla_train_step(images)
    self.assertAllClose(eager_logits, xla_logits, rtol=1e-5, atol=1e-5)
    self.assertLen(xla_grads, len(model.trainable_variables))
    for eager_grad, xla_grad in zip(eager_grads, xla_grads):
      self.assertAllClose(eager_grad, xla_grad, rtol=1e-5, atol=1e-5)

  def test_mirrored_strategy(self):
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < _NUM_LOGICAL_CPUS:
      self.skipTest("Needs 2 logical CPUs (TF initialised too early).")
    strategy = _mirrored_strategy()
    per_replica_images = [_images(2, seed=10 + i) for i in range(2)]
    with strategy.scope(), distribution.replica_local_statistics():
      model = wide_resnet.WideResNet(10, 1, 10)
      model(per_replica_images[0], is_training=False)  # Creates variables.
    for variable in model.variables:
      self.assertTrue(strategy.extended.variable_created_in_scope(variable))
      self.assertLen(strategy.experimental_local_results(variable), 2)

    distributed_images = strategy.experimental_distribute_values_from_function(
        lambda ctx: per_replica_images[ctx.replica_id_in_sync_group])

    @tf.function
    def distributed_train_step(images):

      def replica_step(images):
        with tf.GradientTape() as tape:
          logits = model(images, is_training=True)
          loss = tf.reduce_mean(tf.square(logits))
        grads = tape.gradient(loss, model.trainable_variables)
        grads = tf.distribute.get_replica_context().all_reduce("sum", grads)
        return logits, grads

      return strategy.run(replica_step, args=(images,))

    logits, grads = distributed_train_step(distributed_images)
    for replica_logits in strategy.experimental_local_results(logits):
      self.assertAllEqual(replica_logits, tf.zeros([2, 10]))
    self.assertLen(grads, len(model.trainable_variables))

    # Each replica keeps the statistics of its own batches (replica-local
    # variables); reading them across replicas averages the replicas.
    first_bn = model.batch_norms[0]
    replica_means = [tf.reduce_mean(model.stem(x), axis=[0, 1, 2])
                     for x in per_replica_images]
    copies = strategy.experimental_local_results(first_bn.moving_mean.average)
    for copy, expected in zip(copies, replica_means):
      self.assertAllClose(tf.reshape(copy, [-1]), expected, atol=1e-5)
    self.assertNotAllClose(copies[0], copies[1])
    self.assertAllClose(
        tf.reshape(first_bn.moving_mean.value, [-1]),
        tf.reduce_mean(replica_means, axis=0), atol=1e-5)

  @parameterized.parameters(True, False)
  def test_cross_replica_batch_norm_matches_one_device(self, synchronised):
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < _NUM_LOGICAL_CPUS:
      self.skipTest("Needs 2 logical CPUs (TF initialised too early).")
    mirrored = _mirrored_strategy()
    # Distinct per-replica statistics: the second half is shifted and scaled.
    images = tf.concat([_images(4, seed=20), 3.0 * _images(4, seed=21) + 1.0],
                       axis=0)
    targets = tf.random.stateless_normal([8, 10], seed=[22, 0])

    def build(strategy):
      with strategy.scope(), distribution.replica_local_statistics():
        model = wide_resnet.WideResNet(
            10, 1, 10, cross_replica_batch_norm=synchronised)
        model(images[:1], is_training=False)
      return model

    single, replicated = build(tf.distribute.get_strategy()), build(mirrored)
    _randomize_logits_layer(single)
    for source, target in zip(single.variables, replicated.variables):
      target.assign(source)

    def replica_step(model, images, targets):
      with tf.GradientTape() as tape:
        logits = model(images, is_training=True)
        loss = tf.reduce_sum(logits * targets)
      grads = tape.gradient(loss, model.trainable_variables)
      return logits, tf.distribute.get_replica_context().all_reduce(
          "sum", grads)

    expected_logits, expected_grads = tf.function(replica_step)(
        single, images, targets)
    halves = lambda x: mirrored.experimental_distribute_values_from_function(
        lambda ctx: x[4 * ctx.replica_id_in_sync_group:][:4])
    logits, grads = tf.function(lambda x, y: mirrored.run(
        replica_step, args=(replicated, x, y)))(halves(images),
                                                halves(targets))
    logits = tf.concat(mirrored.experimental_local_results(logits), axis=0)
    grads = [mirrored.experimental_local_results(g)[0] for g in grads]
    first_bn = replicated.batch_norms[0]
    if not synchronised:
      self.assertNotAllClose(logits, expected_logits, rtol=1e-3, atol=1e-3)
      return
    self.assertIsInstance(first_bn, wide_resnet.CrossReplicaBatchNorm)
    # The one-device model uses the fused kernel: agreement to float32
    # round-off of two summation orders.
    self.assertAllClose(logits, expected_logits, rtol=1e-5, atol=1e-5)
    for grad, expected in zip(grads, expected_grads):
      self.assertAllClose(grad, expected, rtol=1e-4, atol=1e-4)
    # Every replica's moving averages saw the statistics of the whole batch.
    for copy in mirrored.experimental_local_results(
        first_bn.moving_mean.average):
      self.assertAllClose(copy, single.batch_norms[0].moving_mean.average,
                          atol=1e-5)

  def test_sync_batch_norm_keeps_the_fused_kernel_on_one_replica(self):
    one_replica = wide_resnet.WideResNet(10, 1, 10,
                                         cross_replica_batch_norm=True)
    self.assertNotIsInstance(one_replica.batch_norms[0],
                             wide_resnet.CrossReplicaBatchNorm)
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
      mirrored_one = wide_resnet.WideResNet(10, 1, 10,
                                            cross_replica_batch_norm=True)
    self.assertNotIsInstance(mirrored_one.batch_norms[0],
                             wide_resnet.CrossReplicaBatchNorm)

  def test_cross_replica_batch_norm_equals_batch_norm_on_one_replica(self):
    images = 2.0 * _images(4, seed=30) + 0.5
    plain = snt.BatchNorm(True, True, decay_rate=0.9)
    synced = wide_resnet.CrossReplicaBatchNorm(True, True, decay_rate=0.9)
    self.assertAllClose(synced(images, is_training=True),
                        plain(images, is_training=True), atol=1e-4)
    self.assertAllClose(synced.moving_mean.value, plain.moving_mean.value,
                        atol=1e-5)


if __name__ == "__main__":
  tf.test.main()
