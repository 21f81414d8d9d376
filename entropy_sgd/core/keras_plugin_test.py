"""The Keras optimizer against the Sonnet/compiled path, and Keras' machinery.

A Dense-tanh-Dense Keras model trained by plain `model.fit` with
`keras_plugin.EntropySGD` must follow the weights of the same MLP trained by
`train_step.make_train_step` with `optimizers.EntropySGD` (same initial
weights, minibatches and noise), under one device and `MirroredStrategy`;
resuming, saving, mixed precision and evaluation must not disturb it.
"""

import functools
import os

from absl.testing import parameterized
import keras
import numpy as np
import sonnet as snt
import tensorflow as tf

from entropy_sgd.core import distribution
from entropy_sgd.core import keras_plugin as esgd_keras
from entropy_sgd.core import optimizers
from entropy_sgd.core import testing
from entropy_sgd.core import train_step as train_step_lib

NUM_FEATURES, NUM_HIDDEN, NUM_CLASSES = 6, 5, 3
BATCH = 8
make_data = functools.partial(testing.make_data, batch=BATCH,
                              features=NUM_FEATURES, classes=NUM_CLASSES)
assert_close_relative = testing.assert_close_relative
mirrored_strategy = testing.mirrored_strategy
HYPER = dict(learning_rate=0.7, num_langevin_steps=4,
             langevin_learning_rate=0.05, gamma=0.3, scoping=0.2, noise=0.05,
             alpha=0.75, weight_decay=0.01, seed=7)
L = HYPER["num_langevin_steps"]


class SonnetMLP(snt.Module):
  """Same MLP; attribute names keep Keras' variable order (w1, b1, w2, b2)."""

  def __init__(self):
    super().__init__(name="mlp")
    self.p0_w = tf.Variable(tf.zeros([NUM_FEATURES, NUM_HIDDEN]))
    self.p1_b = tf.Variable(tf.zeros([NUM_HIDDEN]))
    self.p2_w = tf.Variable(tf.zeros([NUM_HIDDEN, NUM_CLASSES]))
    self.p3_b = tf.Variable(tf.zeros([NUM_CLASSES]))

  def __call__(self, x, is_training, use_dropout=None):  # No dropout.
    del is_training
    return tf.tanh(x @ self.p0_w + self.p1_b) @ self.p2_w + self.p3_b


def initial_weights():
  rng = np.random.RandomState(42)
  shapes = [[NUM_FEATURES, NUM_HIDDEN], [NUM_HIDDEN],
            [NUM_HIDDEN, NUM_CLASSES], [NUM_CLASSES]]
  return [rng.normal(scale=0.5, size=s).astype(np.float32) for s in shapes]


def batches(x, y):
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(
      BATCH, drop_remainder=True)


def run_sonnet(x, y, num_outer, conventions, strategy=None,
               learning_rates=None):
  """The Sonnet path; `learning_rates[t]` is eta of outer step t."""
  strategy = strategy or tf.distribute.get_strategy()
  model = train_step_lib.build_model(strategy, SonnetMLP, [NUM_FEATURES])
  for v, w in zip(model.trainable_variables, initial_weights()):
    v.assign(w)
  learning_rate = tf.Variable(HYPER["learning_rate"])
  optimizer = optimizers.EntropySGD(
      conventions=conventions,
      **dict(HYPER, learning_rate=learning_rate))
  step = train_step_lib.make_train_step(model, optimizer, strategy,
                                        global_batch_size=BATCH)
  iterator = iter(strategy.experimental_distribute_dataset(batches(x, y)))
  metrics = []
  for t in range(num_outer):
    if learning_rates is not None:
      learning_rate.assign(learning_rates[t])
    metrics.append(step(iterator))
  return [v.numpy() for v in model.trainable_variables], metrics


def steps_per_outer(conventions):
  return L + int(optimizers.PRESETS[conventions].needs_anchor_gradient)


def make_keras_model(conventions="paper", jit_compile=False, strategy=None,
                     steps_per_execution=1, **overrides):
  strategy = strategy or tf.distribute.get_strategy()
  with strategy.scope():
    model = keras.Sequential([
        keras.Input([NUM_FEATURES]),
        keras.layers.Dense(NUM_HIDDEN, activation="tanh"),
        keras.layers.Dense(NUM_CLASSES),
    ])
    model.set_weights(initial_weights())
    hyper = dict(HYPER, **overrides)
    model.compile(
        optimizer=esgd_keras.EntropySGD(conventions=conventions, **hyper),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"], jit_compile=jit_compile,
        steps_per_execution=steps_per_execution)
  return model


def batch_norm_mlp(hidden=NUM_HIDDEN, activation="tanh"):
  """Dense -> BatchNorm -> activation -> Dense, not compiled."""
  return keras.Sequential([
      keras.Input([NUM_FEATURES]),
      keras.layers.Dense(hidden),
      keras.layers.BatchNormalization(),
      keras.layers.Activation(activation),
      keras.layers.Dense(NUM_CLASSES),
  ])


def make_batch_norm_model():
  model = batch_norm_mlp()
  model.compile(optimizer=esgd_keras.EntropySGD(**HYPER),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True), metrics=["accuracy"])
  return model


def assert_equal_weights(test, actual, expected):
  for a, e in zip(actual, expected):
    test.assertAllEqual(a, e)


class Interrupt(keras.callbacks.Callback):

  def __init__(self, epoch):
    super().__init__()
    self.epoch = epoch

  def on_epoch_end(self, epoch, logs=None):
    if epoch == self.epoch:
      raise RuntimeError("interrupted")


class WeightsAtEvaluation(keras.callbacks.Callback):
  """Records the weights Keras evaluates."""

  def __init__(self):
    super().__init__()
    self.weights = []

  def on_test_begin(self, logs=None):
    self.weights.append(self.model.get_weights())


def anchor_values(model):
  return [v.numpy() for v in model.optimizer.anchor]


class MatchesSonnetTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters("paper", "lua_reference", "pytorch_reference")
  def test_fit_follows_the_sonnet_path(self, conventions):
    num_outer = 3
    per_outer = steps_per_outer(conventions)
    x, y = make_data(num_outer * per_outer)
    expected, sonnet_metrics = run_sonnet(x, y, num_outer, conventions)
    model = make_keras_model(conventions)
    history = model.fit(batches(x, y), epochs=1, verbose=0, shuffle=False)
    assert_close_relative(self, model.get_weights(), expected)
    optimizer = model.optimizer
    self.assertEqual(int(optimizer.iterations.numpy()), num_outer * per_outer)
    self.assertEqual(int(optimizer.outer_step.numpy()), num_outer)
    self.assertEqual(int(optimizer.inner_step.numpy()), 0)
    self.assertAllClose(optimizer.gamma(num_outer - 1),
                        sonnet_metrics[-1]["gamma"], rtol=1e-6)
    if per_outer == L:  # Keras' loss: the mean over every minibatch, at x'.
      self.assertAllClose(
          history.history["loss"][-1],
          np.mean([float(m["loss"]) for m in sonnet_metrics]), rtol=1e-5)

  def test_learning_rate_schedule_steps_per_minibatch(self):
    # eta of outer step t is the schedule at the L-th minibatch of step t.
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [2 * L - 1], [0.7, 0.2])
    x, y = make_data(3 * L)
    expected, _ = run_sonnet(x, y, 3, "paper",
                             learning_rates=[0.7, 0.7, 0.2])
    model = make_keras_model("paper", learning_rate=schedule)
    model.fit(batches(x, y), epochs=1, verbose=0)
    assert_close_relative(self, model.get_weights(), expected)

  def test_jit_compile(self):
    x, y = make_data(2 * L)
    model = make_keras_model("paper", jit_compile=True, noise=0.0)
    model.fit(batches(x, y), epochs=1, verbose=0)
    reference = make_keras_model("paper", noise=0.0)
    reference.fit(batches(x, y), epochs=1, verbose=0)
    # Without noise, XLA and TF kernels agree (their normal samples differ).
    assert_close_relative(self, model.get_weights(), reference.get_weights())

  def test_steps_per_execution(self):
    x, y = make_data(3 * L + 1)
    model = make_keras_model("lua_reference", steps_per_execution=3)
    model.fit(batches(x, y), epochs=2, verbose=0)
    reference = make_keras_model("lua_reference")
    reference.fit(batches(x, y), epochs=2, verbose=0)
    self.assertEqual(int(model.optimizer.iterations.numpy()),
                     int(reference.optimizer.iterations.numpy()))
    # The same steps; the looped graph may fuse ops differently (round-off).
    assert_close_relative(self, model.get_weights(), reference.get_weights(),
                          rtol=1e-6)


class WhatKerasSeesTest(tf.test.TestCase):

  def test_fit_ends_showing_x_mid_outer_step(self):
    x, y = make_data(L + 2)  # The epoch ends 2 steps into an outer step.
    model = make_keras_model("paper")
    model.fit(batches(x, y), epochs=1, verbose=0)
    self.assertEqual(int(model.optimizer.inner_step.numpy()), 2)
    assert_equal_weights(self, model.get_weights(), anchor_values(model))
    predictions = model.predict(x, verbose=0)
    shown = make_keras_model("paper")
    shown.set_weights(anchor_values(model))
    self.assertAllClose(shown.predict(x, verbose=0), predictions)

  def test_next_fit_puts_the_sample_back_without_a_step(self):
    x, y = make_data(L + 2)
    model = make_keras_model("paper")
    model.fit(batches(x, y), epochs=1, verbose=0)
    sample = [v.numpy() for v in model.optimizer.sample]
    counters = (int(model.optimizer.inner_step.numpy()),
                int(model.optimizer.outer_step.numpy()))
    model.fit(batches(x[:BATCH], y[:BATCH]), epochs=1, verbose=0)
    self.assertEqual((int(model.optimizer.inner_step.numpy()),
                      int(model.optimizer.outer_step.numpy())), counters)
    # One batch restored x', and that fit ended showing x again.
    assert_equal_weights(self, model.get_weights(), anchor_values(model))
    assert_equal_weights(self, [v.numpy() for v in model.optimizer.sample],
                         sample)

  def test_validation_sees_x_and_training_is_undisturbed(self):
    x, y = make_data(L + 1)  # Not a multiple of L.
    recorder = WeightsAtEvaluation()
    model = make_keras_model("paper")
    anchors = []

    class Anchors(keras.callbacks.Callback):

      def on_test_begin(self, logs=None):
        anchors.append(anchor_values(self.model))

    model.fit(batches(x, y), epochs=3, verbose=0,
              validation_data=batches(x, y),
              callbacks=[esgd_keras.EvaluateAtAnchor(), recorder, Anchors()])
    self.assertLen(recorder.weights, 3)
    for seen, anchor in zip(recorder.weights, anchors):
      assert_equal_weights(self, seen, anchor)
    reference = make_keras_model("paper")
    reference.fit(batches(x, y), epochs=3, verbose=0)
    assert_equal_weights(self, model.get_weights(), reference.get_weights())


class DiagnosticsTest(tf.test.TestCase):

  def test_gamma_and_distance_reach_history_and_tensorboard(self):
    x, y = make_data(2 * L)
    model = make_keras_model("lua_reference")
    log_dir = self.create_tempdir().full_path
    history = model.fit(batches(x, y), epochs=2, verbose=0, callbacks=[
        esgd_keras.Diagnostics(), keras.callbacks.TensorBoard(log_dir)])
    offset = optimizers.LUA_REFERENCE.scoping_offset
    self.assertAllClose(history.history["gamma"],
                        [0.3 * 1.2**(2 + offset), 0.3 * 1.2**(4 + offset)],
                        rtol=1e-6)
    self.assertEqual(history.history["outer_step"], [2, 4])
    self.assertGreater(history.history["anchor_to_mean_distance"][0], 0.0)
    tags = set()
    for root, _, files in os.walk(log_dir):
      for name in files:
        for event in tf.compat.v1.train.summary_iterator(
            os.path.join(root, name)):
          tags.update(v.tag for v in event.summary.value)
    self.assertIn("epoch_gamma", tags)


class ResumeTest(tf.test.TestCase):

  def test_keras_file_resumes_exactly(self):
    x, y = make_data(2 * L)
    uninterrupted = make_keras_model("lua_reference")
    uninterrupted.fit(batches(x, y), epochs=4, verbose=0)
    model = make_keras_model("lua_reference")
    model.fit(batches(x, y), epochs=2, verbose=0)
    path = os.path.join(self.create_tempdir().full_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    self.assertIsInstance(loaded.optimizer, esgd_keras.EntropySGD)
    self.assertEqual(loaded.optimizer.get_config(),
                     model.optimizer.get_config())
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
      self.assertAllEqual(a.numpy(), b.numpy())
    loaded.fit(batches(x, y), epochs=2, verbose=0)
    assert_equal_weights(self, loaded.get_weights(),
                         uninterrupted.get_weights())
    self.assertEqual(int(loaded.optimizer.outer_step.numpy()), 8)

  def test_backup_and_restore_resumes_exactly_mid_outer_step(self):
    x, y = make_data(L + 2)  # Epochs end inside outer steps.
    uninterrupted = make_keras_model("paper")
    uninterrupted.fit(batches(x, y), epochs=4, verbose=0)
    backup_dir = self.create_tempdir().full_path
    model = make_keras_model("paper")
    with self.assertRaisesRegex(RuntimeError, "interrupted"):
      model.fit(batches(x, y), epochs=4, verbose=0, callbacks=[
          keras.callbacks.BackupAndRestore(backup_dir), Interrupt(1)])
    resumed = make_keras_model("paper")  # A fresh process would do this.
    resumed.fit(batches(x, y), epochs=4, verbose=0, callbacks=[
        keras.callbacks.BackupAndRestore(backup_dir)])
    self.assertEqual(int(resumed.optimizer.iterations.numpy()),
                     4 * (L + 2))
    assert_equal_weights(self, resumed.get_weights(),
                         uninterrupted.get_weights())

  def test_weights_only_checkpoint_resumes_exactly(self):
    x, y = make_data(2 * L)
    uninterrupted = make_keras_model("paper")
    uninterrupted.fit(batches(x, y), epochs=3, verbose=0)
    path = os.path.join(self.create_tempdir().full_path, "ckpt.weights.h5")
    model = make_keras_model("paper")
    model.fit(batches(x, y), epochs=2, verbose=0, callbacks=[
        keras.callbacks.ModelCheckpoint(path, save_weights_only=True)])
    restored = make_keras_model("paper")
    # As for any stateful Keras optimizer: build it, then load its state.
    restored.optimizer.build(restored.trainable_variables)
    restored.load_weights(path)
    self.assertEqual(int(restored.optimizer.outer_step.numpy()), 4)
    restored.fit(batches(x, y), epochs=1, verbose=0)
    assert_equal_weights(self, restored.get_weights(),
                         uninterrupted.get_weights())


class BatchNormTest(tf.test.TestCase):

  def test_batch_norm_recalibration(self):
    x, y = make_data(2 * L)
    model = make_batch_norm_model()
    bn = model.layers[1]
    recalibrate = esgd_keras.RecalibrateBatchNorm(batches(x, y),
                                                  num_batches=3)
    model.fit(batches(x, y), epochs=1, verbose=0,
              validation_data=batches(x, y), callbacks=[recalibrate])
    # The statistics are the exact mean over 3 batches at the final x.
    hidden = model.layers[0](x[:3 * BATCH]).numpy().reshape(3, BATCH, -1)
    self.assertAllClose(bn.moving_mean.numpy(),
                        hidden.mean(axis=1).mean(axis=0), rtol=1e-4,
                        atol=1e-5)
    self.assertEqual(bn.momentum, 0.99)


class MisuseTest(tf.test.TestCase):

  def test_bad_hyperparameters(self):
    with self.assertRaisesRegex(ValueError, "Unknown conventions"):
      esgd_keras.EntropySGD(conventions="torch")
    with self.assertRaisesRegex(ValueError, "num_langevin_steps"):
      esgd_keras.EntropySGD(num_langevin_steps=0)
    with self.assertRaisesRegex(ValueError, "learning_rate"):
      esgd_keras.EntropySGD(learning_rate=0.0)
    with self.assertRaisesRegex(ValueError, "clipnorm"):
      esgd_keras.EntropySGD(clipnorm=1.0)

  def test_unused_variable_is_refused(self):
    inputs = keras.Input([NUM_FEATURES])
    used = keras.layers.Dense(NUM_CLASSES)
    unused = keras.layers.Dense(NUM_CLASSES)
    unused.build([None, NUM_FEATURES])
    model = keras.Model(inputs, used(inputs))
    model.unused = unused
    model.compile(optimizer=esgd_keras.EntropySGD(**HYPER), loss=(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True)))
    x, y = make_data(L)
    with self.assertRaisesRegex(ValueError, "does not depend on it"):
      model.fit(batches(x, y), epochs=1, verbose=0)


@functools.lru_cache(maxsize=None)
class MirroredStrategyTest(tf.test.TestCase):

  def test_two_replicas_follow_one_device_and_sonnet(self):
    self.assertLen(tf.config.list_logical_devices("CPU"), 2,
                   "setUpModule sets up 2 logical CPUs")
    mirrored = mirrored_strategy()
    num_outer = 3
    x, y = make_data(num_outer * L)
    single = make_keras_model("lua_reference")
    single.fit(batches(x, y), epochs=1, verbose=0)
    replicated = make_keras_model("lua_reference", strategy=mirrored)
    replicated.fit(batches(x, y), epochs=1, verbose=0)
    assert_close_relative(self, replicated.get_weights(),
                          single.get_weights())
    for variable in replicated.trainable_variables:
      copies = variable.value.values
      self.assertLen(copies, 2)
      self.assertAllEqual(copies[0].numpy(), copies[1].numpy())
    expected, _ = run_sonnet(x, y, num_outer, "lua_reference",
                             strategy=mirrored)
    assert_close_relative(self, replicated.get_weights(), expected)
    self.assertEqual(int(replicated.optimizer.outer_step.numpy()), num_outer)


class MixedPrecisionTest(tf.test.TestCase):

  def tearDown(self):
    keras.mixed_precision.set_global_policy("float32")
    super().tearDown()

  def fit_wide_model(self, seed, noise, hidden=256):
    """One Entropy-SGD step (L=1, paper conventions); returns the model."""
    keras.utils.set_random_seed(0)
    model = batch_norm_mlp(hidden, "relu")
    model.compile(optimizer=esgd_keras.EntropySGD(
        learning_rate=1.0, num_langevin_steps=1, langevin_learning_rate=0.1,
        gamma=0.3, scoping=0.0, noise=noise, alpha=0.75, seed=seed,
        conventions="paper"), loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True))
    x, y = make_data(1)
    model.fit(batches(x, y), epochs=1, verbose=0)
    return model

  def test_bfloat16_state_stays_float32(self):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = self.fit_wide_model(seed=0, noise=1e-4)
    self.assertEqual(model.layers[0].compute_dtype, "bfloat16")
    self.assertEqual({v.dtype for v in model.variables}, {"float32"})
    for name in ("anchor", "mean", "sample"):
      self.assertEqual({v.dtype for v in getattr(model.optimizer, name)},
                       {"float32"}, name)

  def test_bfloat16_noise_reaches_the_float32_weights(self):
    # L=1, paper conventions: x <- x - eta gamma alpha (x - x'), so two
    # noise seeds move x apart by eta gamma alpha sqrt(eta') eps (n1 - n2),
    # std 5e-6 here: far below what bfloat16 weights could hold.
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    weights = [np.concatenate([w.ravel() for w in self.fit_wide_model(
        seed, noise=1e-4).get_weights()[:2]]) for seed in (0, 1)]
    expected_std = 1.0 * 0.3 * 0.75 * np.sqrt(0.1) * 1e-4 * np.sqrt(2.0)
    self.assertAllClose(np.std(weights[0] - weights[1]), expected_std,
                        rtol=0.1)

  def test_float16_skipped_step_keeps_the_noise_keys(self):
    # Keras wraps the optimizer in its LossScaleOptimizer. A batch whose
    # gradient overflows is skipped as if it were not there: the run
    # equals one without it (the noise of (t, l) is the same).
    keras.mixed_precision.set_global_policy("mixed_float16")
    x, y = make_data(2 * L)
    inf_x = np.concatenate([x[:BATCH], np.full_like(x[:BATCH], np.inf),
                            x[BATCH:]])
    inf_y = np.concatenate([y[:BATCH], y[:BATCH], y[BATCH:]])
    with_inf = make_keras_model("paper")
    self.assertIsInstance(with_inf.optimizer,
                          keras.optimizers.LossScaleOptimizer)
    with_inf.fit(batches(inf_x, inf_y), epochs=1, verbose=0)
    without = make_keras_model("paper")
    without.fit(batches(x, y), epochs=1, verbose=0)
    inner = with_inf.optimizer.inner_optimizer
    self.assertEqual(int(inner.outer_step.numpy()), 2)
    self.assertEqual(float(with_inf.optimizer.dynamic_scale.numpy()),
                     float(without.optimizer.dynamic_scale.numpy()) / 2)
    self.assertEqual({v.dtype for v in with_inf.trainable_variables},
                     {"float32"})
    assert_close_relative(self, with_inf.get_weights(),
                          without.get_weights(), rtol=1e-6)


def setUpModule():
  distribution.logical_cpus(2)  # Before TensorFlow starts up.


if __name__ == "__main__":
  tf.test.main()
