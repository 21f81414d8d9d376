"""Mixed-precision layers and dynamic loss scaling."""

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from entropy_sgd.core import precision


class PolicyTest(tf.test.TestCase):

  def test_names(self):
    self.assertIsNone(precision.compute_dtype("float32"))
    self.assertEqual(precision.compute_dtype("mixed_bfloat16"), tf.bfloat16)
    self.assertEqual(precision.compute_dtype("mixed_float16"), tf.float16)
    self.assertTrue(precision.uses_loss_scaling("mixed_float16"))
    self.assertFalse(precision.uses_loss_scaling("mixed_bfloat16"))
    with self.assertRaisesRegex(ValueError, "--precision='half' is unknown"):
      precision.compute_dtype("half")


class LayerTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(tf.bfloat16, tf.float16)
  def test_variables_float32_compute_16_bit(self, dtype):
    layers = [
        (precision.Linear(4), tf.ones([2, 3], dtype)),
        (precision.Conv2D(4, 3), tf.ones([2, 5, 5, 3], dtype)),
        (precision.BatchNorm(True, True), tf.ones([2, 3], dtype)),
        (precision.BatchNorm(True, True), tf.ones([2, 5, 5, 3], dtype)),
    ]
    for layer, inputs in layers:
      outputs = (layer(inputs, is_training=True)
                 if isinstance(layer, precision.BatchNorm) else layer(inputs))
      self.assertEqual(outputs.dtype, dtype, layer.name)
      self.assertEqual({v.dtype for v in layer.variables
                        if v.dtype.is_floating}, {tf.float32}, layer.name)

  def test_float64_models_stay_float64(self):
    linear = precision.Linear(4)
    self.assertEqual(linear(tf.ones([2, 3], tf.float64)).dtype, tf.float64)
    self.assertEqual(linear.w.dtype, tf.float64)

  @parameterized.parameters(2, 4)  # Unfused (float32 inside) and fused.
  def test_batch_norm_statistics_in_float32(self, rank):
    shape = [64, 3] if rank == 2 else [16, 2, 2, 3]
    # Mean 1000, std 1: bfloat16 resolves 1000 only to 4, float32 to 6e-5.
    inputs = 1000.0 + tf.random.stateless_normal(shape, [1, 2])
    bn = precision.BatchNorm(True, True, decay_rate=0.0)
    outputs = bn(tf.cast(inputs, tf.bfloat16), is_training=True)
    self.assertEqual(outputs.dtype, tf.bfloat16)
    axes = list(range(rank - 1))
    rounded = tf.cast(tf.cast(inputs, tf.bfloat16), tf.float32)
    self.assertAllClose(tf.reshape(bn.moving_mean.value, [-1]),
                        tf.reduce_mean(rounded, axes), rtol=1e-6)
    variance = tf.math.reduce_variance(rounded, axes)
    if rank == 4:  # The fused kernel returns the unbiased variance.
      variance *= 64.0 / 63.0
    self.assertAllClose(tf.reshape(bn.moving_variance.value, [-1]),
                        variance, rtol=1e-3)

  def test_logits_to_float32(self):
    self.assertEqual(precision.logits_to_float32(
        tf.ones([1], tf.bfloat16)).dtype, tf.float32)
    self.assertEqual(precision.logits_to_float32(
        tf.ones([1], tf.float64)).dtype, tf.float64)


class LossScaleTest(tf.test.TestCase):

  def test_all_finite(self):
    self.assertTrue(precision.all_finite([tf.ones([2]), tf.zeros([3])]))
    self.assertFalse(precision.all_finite([tf.ones([2]),
                                           tf.constant([0.0, np.inf])]))
    self.assertFalse(precision.all_finite([tf.constant([np.nan])]))

  def test_next_loss_scale(self):
    def step(scale, count, finite):
      new_scale, new_count = precision.next_loss_scale(
          tf.constant(scale), tf.constant(count, tf.int64),
          tf.constant(finite), growth_interval=3, minimum_scale=1.0)
      return float(new_scale), int(new_count)

    self.assertEqual(step(8.0, 0, True), (8.0, 1))
    self.assertEqual(step(8.0, 2, True), (16.0, 0))  # 3rd finite: doubles.
    self.assertEqual(step(8.0, 2, False), (4.0, 0))  # Overflow: halves.
    self.assertEqual(step(1.0, 1, False), (1.0, 0))  # Not below the floor.

  def test_variables_scale_and_count(self):
    loss_scale = precision.DynamicLossScale(initial_scale=4.0,
                                            growth_interval=2)
    self.assertEqual(float(loss_scale.scale_loss(tf.constant(1.5))), 6.0)
    self.assertAllEqual(loss_scale.unscale([tf.constant([8.0])])[0], [2.0])
    for finite in (True, False, True, True, False):
      loss_scale.update(tf.constant(finite))
    # 4 -> 4 -> 2 -> 2 -> 4 (two finite in a row) -> 2.
    self.assertEqual(float(loss_scale.scale.numpy()), 2.0)
    self.assertEqual(int(loss_scale.skipped_updates.numpy()), 2)
    self.assertFalse(loss_scale.at_minimum)
    self.assertEqual({v.dtype for v in loss_scale.variables},
                     {tf.float32, tf.int64})

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "initial_scale"):
      precision.DynamicLossScale(initial_scale=0.5)
    with self.assertRaisesRegex(ValueError, "growth_interval"):
      precision.DynamicLossScale(growth_interval=0)


if __name__ == "__main__":
  tf.test.main()
