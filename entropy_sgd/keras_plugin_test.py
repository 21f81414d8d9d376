"""The Keras plugin against the Sonnet/compiled path, and Keras' machinery.

A Dense-tanh-Dense Keras model trained by `model.fit` with
`entropy_sgd.keras_plugin` must follow the weights of the same MLP trained by
`train_step.make_train_step` with `optimizers.EntropySGD` (same initial
weights, minibatches and noise), under one device and `MirroredStrategy`.
"""

import functools
import os
import warnings

from absl.testing import parameterized
import keras
import numpy as np
import sonnet as snt
import tensorflow as tf

from entropy_sgd import distribution
from entropy_sgd import keras_plugin as esgd_keras
from entropy_sgd import optimizers
from entropy_sgd import train_step as train_step_lib

NUM_FEATURES, NUM_HIDDEN, NUM_CLASSES = 6, 5, 3
BATCH = 8
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

  def __call__(self, x, is_training):
    del is_training
    return tf.tanh(x @ self.p0_w + self.p1_b) @ self.p2_w + self.p3_b


def initial_weights():
  rng = np.random.RandomState(42)
  shapes = [[NUM_FEATURES, NUM_HIDDEN], [NUM_HIDDEN],
            [NUM_HIDDEN, NUM_CLASSES], [NUM_CLASSES]]
  return [rng.normal(scale=0.5, size=s).astype(np.float32) for s in shapes]


def make_data(num_batches, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.normal(size=(num_batches * BATCH, NUM_FEATURES)).astype(np.float32)
  y = rng.randint(NUM_CLASSES, size=num_batches * BATCH).astype(np.int32)
  return x, y


def batches(x, y):
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(
      BATCH, drop_remainder=True)


def run_sonnet(x, y, num_outer, conventions, strategy=None):
  strategy = strategy or tf.distribute.get_strategy()
  model = train_step_lib.build_model(strategy, SonnetMLP, [NUM_FEATURES])
  for v, w in zip(model.trainable_variables, initial_weights()):
    v.assign(w)
  optimizer = optimizers.EntropySGD(conventions=conventions, **HYPER)
  step = train_step_lib.make_train_step(model, optimizer, strategy,
                                        global_batch_size=BATCH)
  iterator = iter(strategy.experimental_distribute_dataset(batches(x, y)))
  metrics = [step(iterator) for _ in range(num_outer)]
  return [v.numpy() for v in model.trainable_variables], metrics


def make_keras_model(conventions="paper", jit_compile=False, strategy=None,
                     **overrides):
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
        metrics=["accuracy"], jit_compile=jit_compile)
    esgd_keras.attach(model)
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
  """`batch_norm_mlp()`, compiled and attached."""
  model = batch_norm_mlp()
  model.compile(optimizer=esgd_keras.EntropySGD(**HYPER),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True), metrics=["accuracy"])
  esgd_keras.attach(model)
  return model


def assert_close_relative(test, actual, expected, rtol=1e-5):
  for i, (a, e) in enumerate(zip(actual, expected)):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    scale = max(np.abs(e).max(), 1e-3)
    test.assertLessEqual(np.abs(a - e).max() / scale, rtol,
                         f"parameter {i} differs by {np.abs(a - e).max():.3g}")


class Recorder(keras.callbacks.Callback):

  def __init__(self):
    super().__init__()
    self.batch_logs, self.epoch_logs = [], []

  def on_train_batch_end(self, batch, logs=None):
    self.batch_logs.append(dict(logs))

  def on_epoch_end(self, epoch, logs=None):
    self.epoch_logs.append(dict(logs))


class Interrupt(keras.callbacks.Callback):

  def __init__(self, epoch):
    super().__init__()
    self.epoch = epoch

  def on_epoch_end(self, epoch, logs=None):
    if epoch == self.epoch:
      raise RuntimeError("interrupted")


class MatchesSonnetTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(conventions=["paper", "lua_reference"],
                         unroll=[False, True])
  def test_fit_follows_the_sonnet_path(self, conventions, unroll):
    num_outer = 3
    x, y = make_data(num_outer * L)
    expected, sonnet_metrics = run_sonnet(x, y, num_outer, conventions)
    model = make_keras_model(conventions)
    esgd_keras._UNROLL = unroll  # pylint: disable=protected-access
    try:
      history = model.fit(esgd_keras.group_batches(batches(x, y), L),
                          epochs=1, verbose=0, shuffle=False)
    finally:
      esgd_keras._UNROLL = False  # pylint: disable=protected-access
    assert_close_relative(self, model.get_weights(), expected)
    self.assertEqual(int(model.optimizer.iterations.numpy()), num_outer)
    self.assertAllClose(history.history["gamma"][-1],
                        sonnet_metrics[-1]["gamma"], rtol=1e-6)
    self.assertAllClose(history.history["anchor_to_mean_distance"][-1],
                        sonnet_metrics[-1]["anchor_to_mean_distance"],
                        rtol=1e-4)
    # Keras' loss is the mean over all inner batches of the epoch.
    self.assertAllClose(
        history.history["loss"][-1],
        np.mean([float(m["loss"]) for m in sonnet_metrics]), rtol=1e-5)

  def test_jit_compile(self):
    num_outer = 2
    x, y = make_data(num_outer * L)
    model = make_keras_model("paper", jit_compile=True, noise=0.0)
    model.fit(esgd_keras.group_batches(batches(x, y), L), epochs=1,
              verbose=0)
    reference = make_keras_model("paper", noise=0.0)
    reference.fit(esgd_keras.group_batches(batches(x, y), L), epochs=1,
                  verbose=0)
    # Without noise, XLA and TF kernels agree (their normal samples differ).
    assert_close_relative(self, model.get_weights(), reference.get_weights())


class CallbacksTest(tf.test.TestCase):

  def test_gamma_and_distance_reach_the_logs_and_tensorboard(self):
    x, y = make_data(3 * L)
    model = make_keras_model("lua_reference")
    recorder = Recorder()
    log_dir = self.create_tempdir().full_path
    history = model.fit(
        esgd_keras.group_batches(batches(x, y), L), epochs=2, verbose=0,
        validation_data=batches(x, y),
        callbacks=[recorder,
                   keras.callbacks.TensorBoard(log_dir, update_freq=1)])
    offset = optimizers.LUA_REFERENCE.scoping_offset
    gammas = [logs["gamma"] for logs in recorder.batch_logs]
    self.assertLen(gammas, 6)
    self.assertAllClose(
        gammas, [0.3 * 1.2**(t + offset) for t in range(6)], rtol=1e-6)
    self.assertAllClose(history.history["gamma"],
                        [0.3 * 1.2**(2 + offset), 0.3 * 1.2**(5 + offset)],
                        rtol=1e-6)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy",
                "anchor_to_mean_distance"):
      self.assertLen(history.history[key], 2)
    self.assertGreater(history.history["anchor_to_mean_distance"][0], 0.0)
    tags = set()
    for root, _, files in os.walk(log_dir):
      for name in files:
        for event in tf.compat.v1.train.summary_iterator(
            os.path.join(root, name)):
          tags.update(v.tag for v in event.summary.value)
    self.assertIn("epoch_gamma", tags)
    self.assertIn("epoch_anchor_to_mean_distance", tags)

  def test_backup_and_restore_resumes_exactly(self):
    x, y = make_data(2 * L)
    data = esgd_keras.group_batches(batches(x, y), L)
    uninterrupted = make_keras_model("paper")
    uninterrupted.fit(data, epochs=4, verbose=0)

    backup_dir = self.create_tempdir().full_path
    model = make_keras_model("paper")
    with self.assertRaisesRegex(RuntimeError, "interrupted"):
      model.fit(data, epochs=4, verbose=0, callbacks=[
          keras.callbacks.BackupAndRestore(backup_dir), Interrupt(1)])
    resumed = make_keras_model("paper")  # A fresh process would do this.
    recorder = Recorder()
    resumed.fit(data, epochs=4, verbose=0, callbacks=[
        keras.callbacks.BackupAndRestore(backup_dir), recorder])
    self.assertLen(recorder.epoch_logs, 2)  # Only epochs 2 and 3 ran.
    self.assertEqual(int(resumed.optimizer.iterations.numpy()), 8)
    self.assertAllClose(recorder.epoch_logs[-1]["gamma"], 0.3 * 1.2**7,
                        rtol=1e-6)
    for a, b in zip(resumed.get_weights(), uninterrupted.get_weights()):
      self.assertAllEqual(a, b)

  def test_checkpoint_evaluate_predict_and_keras_file(self):
    x, y = make_data(2 * L)
    model = make_keras_model("paper")
    directory = self.create_tempdir().full_path
    weights = os.path.join(directory, "ckpt.weights.h5")
    model.fit(esgd_keras.group_batches(batches(x, y), L), epochs=1,
              verbose=0, callbacks=[keras.callbacks.ModelCheckpoint(
                  weights, save_weights_only=True)])
    self.assertTrue(os.path.exists(weights))
    restored = make_keras_model("paper")
    restored.load_weights(weights)
    self.assertEqual(int(restored.optimizer.iterations.numpy()), 2)
    for a, b in zip(restored.get_weights(), model.get_weights()):
      self.assertAllEqual(a, b)

    loss, accuracy = model.evaluate(x, y, verbose=0)
    self.assertBetween(accuracy, 0.0, 1.0)
    self.assertGreater(loss, 0.0)
    predictions = model.predict(x, verbose=0)
    path = os.path.join(directory, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    self.assertAllClose(loaded.predict(x, verbose=0), predictions)
    self.assertIsInstance(loaded.optimizer, esgd_keras.EntropySGD)
    self.assertEqual(loaded.optimizer.num_langevin_steps, L)

  def test_batch_norm_recalibration(self):
    x, y = make_data(2 * L)
    model = make_batch_norm_model()
    bn = model.layers[1]
    self.assertAllEqual(bn.moving_mean.numpy(), np.zeros(NUM_HIDDEN))
    recalibrate = esgd_keras.RecalibrateBatchNorm(batches(x, y),
                                                  num_batches=3)
    model.fit(esgd_keras.group_batches(batches(x, y), L), epochs=1,
              verbose=0, validation_data=batches(x, y),
              callbacks=[recalibrate])
    # The statistics are the exact mean over 3 batches at the final x.
    hidden = model.layers[0](x[:3 * BATCH]).numpy().reshape(3, BATCH, -1)
    self.assertAllClose(bn.moving_mean.numpy(),
                        hidden.mean(axis=1).mean(axis=0), rtol=1e-4,
                        atol=1e-5)
    self.assertEqual(bn.momentum, 0.99)


class MisuseTest(tf.test.TestCase):

  def test_remainder_of_l_batches(self):
    x, y = make_data(2 * L + 1)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      grouped = esgd_keras.group_batches(batches(x, y), L)
    self.assertTrue(any("last 1 batches" in str(w.message) for w in caught))
    self.assertEqual(int(grouped.cardinality()), 2)
    with self.assertRaisesRegex(ValueError, "not a multiple of L=4"):
      esgd_keras.group_batches(batches(x, y), L, remainder="error")
    with self.assertRaisesRegex(ValueError, "fewer than the L=4"):
      esgd_keras.group_batches(batches(*make_data(3)), L)
    with self.assertRaisesRegex(ValueError, "integer >= 1"):
      esgd_keras.group_batches(batches(x, y), 0)

  def test_short_last_batch_is_dropped(self):
    x, y = make_data(2 * L)
    dataset = tf.data.Dataset.from_tensor_slices((x[:-3], y[:-3])).batch(
        BATCH)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      elements = list(esgd_keras.group_batches(dataset, L))
    self.assertLen(elements, 1)
    self.assertEqual(elements[0][0].shape, (BATCH, L, NUM_FEATURES))
    self.assertAllEqual(elements[0][0][:, 1], x[BATCH:2 * BATCH])

  def test_ungrouped_dataset_is_refused(self):
    x, y = make_data(2 * L)
    model = make_keras_model()
    with self.assertRaisesRegex(ValueError, "group_batches"):
      model.fit(batches(x, y), epochs=1, verbose=0)

  def test_model_without_trainable_weights_is_refused(self):
    model = keras.Sequential([keras.Input([NUM_FEATURES]),
                              keras.layers.Dense(NUM_CLASSES)])
    model.trainable = False
    model.compile(optimizer=esgd_keras.EntropySGD(**HYPER), loss="mse")
    with self.assertRaisesRegex(ValueError, "no trainable weights"):
      esgd_keras.attach(model)

  def test_wrong_optimizer_and_unattached_model_are_refused(self):
    x, y = make_data(2 * L)
    model = keras.Sequential([keras.Input([NUM_FEATURES]),
                              keras.layers.Dense(NUM_CLASSES)])
    model.compile(optimizer="sgd", loss="mse")
    with self.assertRaisesRegex(ValueError, "EntropySGD"):
      esgd_keras.attach(model)
    model.compile(optimizer=esgd_keras.EntropySGD(**HYPER),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    with self.assertRaisesRegex(RuntimeError, "attach"):
      model.fit(batches(x, y), epochs=1, verbose=0)

  def test_bad_hyperparameters(self):
    with self.assertRaisesRegex(ValueError, "Unknown conventions"):
      esgd_keras.EntropySGD(conventions="torch")
    with self.assertRaisesRegex(ValueError, "num_langevin_steps"):
      esgd_keras.EntropySGD(num_langevin_steps=0)
    with self.assertRaisesRegex(ValueError, "clipnorm"):
      esgd_keras.EntropySGD(clipnorm=1.0)


@functools.lru_cache(maxsize=None)
def mirrored_strategy():
  """One instance per process: TF's collective keys clash across several."""
  return tf.distribute.MirroredStrategy(
      [d.name for d in tf.config.list_logical_devices("CPU")])


class MirroredStrategyTest(tf.test.TestCase):

  def test_two_replicas_follow_one_device(self):
    self.assertLen(tf.config.list_logical_devices("CPU"), 2,
                   "setUpModule sets up 2 logical CPUs")
    mirrored = mirrored_strategy()
    num_outer = 3
    x, y = make_data(num_outer * L)
    single = make_keras_model("lua_reference")
    single.fit(esgd_keras.group_batches(batches(x, y), L), epochs=1,
               verbose=0)
    replicated = make_keras_model("lua_reference", strategy=mirrored)
    history = replicated.fit(esgd_keras.group_batches(batches(x, y), L),
                             epochs=1, verbose=0)
    assert_close_relative(self, replicated.get_weights(),
                          single.get_weights())
    for variable in replicated.trainable_variables:
      copies = variable.value.values
      self.assertLen(copies, 2)
      self.assertAllEqual(copies[0].numpy(), copies[1].numpy())
    expected, _ = run_sonnet(x, y, num_outer, "lua_reference",
                             strategy=mirrored)
    assert_close_relative(self, replicated.get_weights(), expected)
    self.assertAllClose(history.history["gamma"][-1], 0.3 * 1.2**3,
                        rtol=1e-6)

  def test_batch_norm_model_with_recalibration_on_two_replicas(self):
    mirrored = mirrored_strategy()
    x, y = make_data(2 * L)
    with mirrored.scope():
      model = make_batch_norm_model()
    history = model.fit(
        esgd_keras.group_batches(batches(x, y), L), epochs=2, verbose=0,
        validation_data=batches(x, y),
        callbacks=[esgd_keras.RecalibrateBatchNorm(batches(x, y),
                                                   num_batches=2)])
    self.assertLen(history.history["val_accuracy"], 2)
    self.assertTrue(np.all(np.isfinite(history.history["val_loss"])))
    # Same all-reduced gradients and noise: bit-identical trainable copies.
    for variable in model.trainable_variables:
      copies = variable.value.values
      self.assertAllEqual(copies[0].numpy(), copies[1].numpy())
    # The recalibrated statistics are the mean over the 2 batches at x.
    hidden = model.layers[0](x[:2 * BATCH]).numpy().reshape(2, BATCH, -1)
    self.assertAllClose(model.layers[1].moving_mean.numpy(),
                        hidden.mean(axis=1).mean(axis=0), rtol=1e-4,
                        atol=1e-5)


class MixedPrecisionTest(tf.test.TestCase):
  """Keras' mixed_bfloat16 policy: bfloat16 compute, float32 state."""

  def setUp(self):
    super().setUp()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    self.addCleanup(keras.mixed_precision.set_global_policy, "float32")

  def fit_wide_model(self, seed, noise, hidden=256):
    """One Entropy-SGD step (L=1, paper conventions); returns the model."""
    keras.utils.set_random_seed(0)
    model = batch_norm_mlp(hidden, "relu")
    model.compile(optimizer=esgd_keras.EntropySGD(
        learning_rate=1.0, num_langevin_steps=1, langevin_learning_rate=0.1,
        gamma=0.3, scoping=0.0, noise=noise, alpha=0.75, seed=seed,
        conventions="paper"), loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True))
    esgd_keras.attach(model)
    x, y = make_data(1)
    model.fit(esgd_keras.group_batches(batches(x, y), 1), epochs=1,
              verbose=0)
    return model

  def test_state_stays_float32_and_compute_is_bfloat16(self):
    model = self.fit_wide_model(seed=0, noise=1e-4)
    self.assertEqual(model.layers[0].compute_dtype, "bfloat16")
    self.assertEqual({v.dtype for v in model.variables}, {"float32"})
    optimizer = model.optimizer
    for name in ("anchor", "mean"):
      self.assertEqual({v.dtype for v in getattr(optimizer, name)},
                       {"float32"}, name)

  def test_noise_reaches_the_float32_weights(self):
    # L=1, paper conventions: x <- x - eta gamma alpha (x - x'), so two
    # noise seeds move x apart by eta gamma alpha sqrt(eta') eps (n1 - n2),
    # std 5e-6 here: far below what bfloat16 weights could hold.
    weights = [np.concatenate([w.ravel() for w in self.fit_wide_model(
        seed, noise=1e-4).get_weights()[:2]]) for seed in (0, 1)]
    expected_std = 1.0 * 0.3 * 0.75 * np.sqrt(0.1) * 1e-4 * np.sqrt(2.0)
    self.assertAllClose(np.std(weights[0] - weights[1]), expected_std,
                        rtol=0.1)

  def test_mixed_float16_is_refused_clearly(self):
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = keras.Sequential([keras.Input([NUM_FEATURES]),
                              keras.layers.Dense(NUM_CLASSES)])
    model.compile(optimizer=esgd_keras.EntropySGD(**HYPER), loss="mse")
    with self.assertRaisesRegex(ValueError,
                                "mixed_float16 policy is not supported"):
      esgd_keras.attach(model)


def setUpModule():
  distribution.logical_cpus(2)  # Before TensorFlow starts up.


if __name__ == "__main__":
  tf.test.main()
