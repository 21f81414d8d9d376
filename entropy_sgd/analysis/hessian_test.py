"""Hessian-vector products and spectrum routines against known answers.

Quadratics f(x) = 1/2 x^T A x with A = Q diag(lambda) Q^T have a known
spectrum; a small BatchNorm MLP checks the products against finite
differences (float64) and MirroredStrategy against the default strategy.
"""

from absl.testing import parameterized
import numpy as np
import sonnet as snt
import tensorflow as tf

from entropy_sgd.analysis import hessian
from entropy_sgd.analysis import testing as analysis_testing
from entropy_sgd.analysis import linear_algebra
from entropy_sgd.core import distribution
from entropy_sgd.core import train_step as train_step_lib
from entropy_sgd.workloads import models


class MLP(snt.Module):
  """Linear -> BatchNorm -> tanh -> Linear -> BatchNorm -> ReLU -> logits."""

  def __init__(self, classes=3):
    super().__init__()
    self.hidden = [snt.Linear(6, with_bias=False), snt.Linear(5,
                                                              with_bias=False)]
    self.norms = [snt.BatchNorm(True, True, decay_rate=0.9) for _ in range(2)]
    self.logits = snt.Linear(classes)

  def __call__(self, images, is_training, use_dropout=None):  # No dropout
    net = tf.reshape(images, [tf.shape(images)[0], -1])
    for linear, bn, activation in zip(self.hidden, self.norms,
                                      (tf.tanh, tf.nn.relu)):
      net = activation(bn(linear(net), is_training=is_training,
                          test_local_stats=False))
    return self.logits(net)


def mlp_data(dtype=tf.float32, examples=16, batch_size=8):
  images = tf.random.stateless_normal([examples, 4], [1, 2], dtype=dtype)
  labels = tf.random.stateless_uniform([examples], [3, 4], maxval=3,
                                       dtype=tf.int32)
  dataset = tf.data.Dataset.from_tensor_slices((images, labels))

  def dataset_fn(context):
    size = (context.get_per_replica_batch_size(batch_size) if context
            else batch_size)
    shard = dataset
    if context and context.num_input_pipelines > 1:
      shard = dataset.shard(context.num_input_pipelines,
                            context.input_pipeline_id)
    return shard.batch(size, drop_remainder=True).repeat()

  return dataset_fn, examples // batch_size


def build_mlp(strategy, dtype=tf.float32, seed=7):
  """An MLP built in `strategy`'s scope with replica-local statistics (as
  `train_step.build_model`), weights drawn from `seed`, in `dtype`."""
  with strategy.scope(), distribution.replica_local_statistics():
    model = MLP()
    model(tf.zeros([1, 4], dtype), is_training=False)
  rng = np.random.default_rng(seed)
  for variable in model.trainable_variables:
    variable.assign(rng.standard_normal(variable.shape).astype(
        variable.dtype.as_numpy_dtype) * 0.7)
  return model


class ProductTest(parameterized.TestCase):

  @parameterized.parameters(*hessian.HVP_METHODS)
  def test_quadratic_hvp_is_a_times_v(self, method):
    matrix = analysis_testing.random_symmetric(np.linspace(-2, 5, 12))
    objective = analysis_testing.quadratic_objective(
        analysis_testing.Quadratic(matrix, np.arange(12.0)), batch_size=2,
        method=method)
    v = np.random.default_rng(1).standard_normal(12)
    np.testing.assert_allclose(objective.hvp(v), matrix @ v, rtol=1e-12,
                               atol=1e-12)
    loss, gradient = objective.loss_and_gradient()
    x = np.arange(12.0)
    self.assertAlmostEqual(loss, 0.5 * x @ matrix @ x, places=9)
    np.testing.assert_allclose(gradient, matrix @ x, rtol=1e-12)

  @parameterized.parameters(*hessian.HVP_METHODS)
  def test_mlp_hvp_matches_finite_differences(self, method):
    dataset_fn, num_batches = mlp_data(tf.float64)
    strategy = tf.distribute.get_strategy()
    model = build_mlp(strategy, tf.float64)
    batches = hessian.Batches(strategy, dataset_fn, num_batches)
    rng = np.random.default_rng(3)  # Sonnet cannot update float64 averages.
    for bn in model.norms:
      bn.moving_mean.average.assign(rng.normal(size=(1, bn.scale.shape[-1])))
      bn.moving_variance.average.assign(
          rng.uniform(0.5, 2, size=(1, bn.scale.shape[-1])))
    objective = hessian.Objective(hessian.classification_loss(model),
                                  model.trainable_variables, batches,
                                  method=method)
    x = objective.get_flat()
    v = np.random.default_rng(2).standard_normal(x.size)
    h = 1e-5
    objective.set_flat(x + h * v)
    plus = objective.loss_and_gradient()[1]
    objective.set_flat(x - h * v)
    minus = objective.loss_and_gradient()[1]
    objective.set_flat(x)
    finite_difference = (plus - minus) / (2 * h)
    product = objective.hvp(v)
    self.assertGreater(np.linalg.norm(product), 1e-2)
    np.testing.assert_allclose(product, finite_difference, rtol=1e-6,
                               atol=1e-8 * np.abs(product).max())

  def test_objective_is_the_mean_over_all_examples(self):
    dataset_fn, num_batches = mlp_data(tf.float64, examples=24, batch_size=8)
    strategy = tf.distribute.get_strategy()
    model = build_mlp(strategy, tf.float64)
    batches = hessian.Batches(strategy, dataset_fn, num_batches)
    self.assertEqual(batches.num_examples, 24)
    objective = hessian.Objective(hessian.classification_loss(model),
                                  model.trainable_variables, batches)
    images = tf.random.stateless_normal([24, 4], [1, 2], dtype=tf.float64)
    labels = tf.random.stateless_uniform([24], [3, 4], maxval=3,
                                         dtype=tf.int32)
    logits = model(images, is_training=False)
    expected = tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    loss, accuracy = objective.loss_and_accuracy()
    self.assertAlmostEqual(loss, float(expected), places=10)
    hits = np.argmax(logits.numpy(), -1) == labels.numpy()
    self.assertAlmostEqual(accuracy, hits.mean(), places=10)


class SpectrumTest(parameterized.TestCase):
  """Lanczos on the objective's H v (the NumPy side: linear_algebra_test)."""

  def test_lanczos_through_the_objective(self):
    spectrum = np.array([7.0, 3.0, 1.0, 0.5, 0.0, -0.5, -2.0, 0.25])
    matrix = analysis_testing.random_symmetric(spectrum, seed=5)
    objective = analysis_testing.quadratic_objective(
        analysis_testing.Quadratic(matrix, np.ones(8)), batch_size=2)
    pairs = linear_algebra.top_eigenpairs(objective.hvp, 8, 3, num_iterations=8,
                                   dtype=np.float64)
    np.testing.assert_allclose(pairs.eigenvalues, [7.0, 3.0, 1.0], rtol=1e-10)
    lowest = linear_algebra.top_eigenpairs(lambda v: -objective.hvp(v), 8, 1, 8,
                                    dtype=np.float64)
    self.assertAlmostEqual(-lowest.eigenvalues[0], -2.0, places=10)


class BatchNormTest(tf.test.TestCase):

  def test_recalibration_and_preserved_state(self):
    strategy = tf.distribute.get_strategy()
    dataset_fn, num_batches = mlp_data()
    model = build_mlp(strategy)
    batches = hessian.Batches(strategy, dataset_fn, num_batches)
    before = [v.numpy() for v in model.variables]
    with hessian.preserved_state(model, strategy):
      hessian.recalibrate_batch_norm(model, batches)
      for v in model.trainable_variables:
        v.assign(v + 1.0)
      self.assertNotAllClose(model.norms[0].moving_mean.value,
                             tf.zeros([1, 6]))
    for value, variable in zip(before, model.variables):
      self.assertAllEqual(value, variable.numpy())

  def test_recalibration_is_the_debiased_average_of_batch_means(self):
    strategy = tf.distribute.get_strategy()
    dataset_fn, _ = mlp_data()
    model = build_mlp(strategy)
    batches = hessian.Batches(strategy, dataset_fn, 2)
    hessian.recalibrate_batch_norm(model, batches)
    images = tf.random.stateless_normal([16, 4], [1, 2])
    means = [tf.reduce_mean(model.hidden[0](images[i:i + 8]), 0)
             for i in (0, 8)]
    # Zero-debiased EMA with decay 0.9 of two values: (0.1 a + 0.09 b)/0.19.
    expected = (0.09 * means[0] + 0.1 * means[1]) / 0.19
    self.assertAllClose(tf.reshape(model.norms[0].moving_mean.value, [-1]),
                        expected, rtol=1e-5)

  def test_recalibration_turns_the_paper_nets_dropout_off(self):
    strategy = tf.distribute.get_strategy()
    model = train_step_lib.build_model(
        strategy, lambda: models.build("mnistfc", 10, dropout=0.5),
        (28, 28, 1))
    images = tf.random.stateless_normal([16, 28, 28, 1], [1, 2])
    dataset = tf.data.Dataset.from_tensor_slices(
        (images, tf.zeros([16], tf.int32))).batch(8).repeat()
    recalibrate = hessian.BatchNormRecalibration(
        model, hessian.Batches(strategy, lambda context: dataset, 2))
    recalibrate()
    first = model.hidden_bns[0].moving_variance.value.numpy()
    recalibrate()  # Dropout would draw new masks (and count the calls).
    self.assertAllEqual(first, model.hidden_bns[0].moving_variance.value)
    self.assertEqual(int(model.dropout_calls.numpy()), 0)


class MirroredTest(parameterized.TestCase, tf.test.TestCase):

  @parameterized.parameters(*hessian.HVP_METHODS)
  def test_mirrored_equals_default(self, method):
    # In float64: float32 products of a confident net carry ~1e-4 relative
    # rounding (softmax curvature p(1 - p) cancels), which would hide a
    # wrong sum over replicas.
    results = {}
    for name, strategy in self.strategies().items():
      dataset_fn, num_batches = mlp_data(tf.float64)
      model = build_mlp(strategy, tf.float64)
      batches = hessian.Batches(strategy, dataset_fn, num_batches)
      objective = hessian.Objective(hessian.classification_loss(model),
                                    model.trainable_variables, batches,
                                    method=method)
      v = np.random.default_rng(5).standard_normal(objective.num_parameters)
      results[name] = (objective.loss_and_accuracy(),
                       objective.loss_and_gradient()[1], objective.hvp(v))
    for default, mirrored in zip(results["default"], results["mirrored"]):
      self.assertAllClose(default, mirrored, rtol=1e-12, atol=1e-12)
    self.assertGreater(np.abs(results["default"][2]).max(), 1e-2)

  def test_mirrored_recalibration_agrees_on_replicas(self):
    strategy = self.strategies()["mirrored"]
    dataset_fn, num_batches = mlp_data()
    model = build_mlp(strategy)
    hessian.recalibrate_batch_norm(
        model, hessian.Batches(strategy, dataset_fn, num_batches))
    for bn in model.norms:
      copies = strategy.experimental_local_results(bn.moving_variance.average)
      self.assertLen(copies, 2)
      self.assertAllEqual(copies[0], copies[1])
      self.assertNotAllClose(copies[0], tf.ones_like(copies[0]))

  def strategies(self):
    mirrored = tf.distribute.MirroredStrategy(distribution.logical_cpus(2))
    self.assertEqual(mirrored.num_replicas_in_sync, 2)
    return {"default": tf.distribute.get_strategy(), "mirrored": mirrored}


class FlatnessTrackerTest(tf.test.TestCase):

  def test_measures_without_changing_the_model(self):
    strategy = tf.distribute.get_strategy()
    dataset_fn, _ = mlp_data()
    model = build_mlp(strategy)
    before = [v.numpy() for v in model.variables]
    tracker = hessian.FlatnessTracker(model, strategy, dataset_fn,
                                      num_batches=2, iterations=30)
    first = tracker.measure()
    for value, variable in zip(before, model.variables):
      self.assertAllEqual(value, variable.numpy())
    # The exact spectrum of the same operator, by dense Lanczos.
    with hessian.preserved_state(model, strategy):
      batches = hessian.Batches(strategy, dataset_fn, 2)
      hessian.recalibrate_batch_norm(model, batches)
      objective = hessian.Objective(hessian.classification_loss(model),
                                    model.trainable_variables, batches)
      n = objective.num_parameters
      dense = np.stack([objective.hvp(e) for e in np.eye(n, dtype=np.float32)])
    eigenvalues = np.linalg.eigvalsh(0.5 * (dense + dense.T))
    dominant = eigenvalues[np.argmax(np.abs(eigenvalues))]
    self.assertAlmostEqual(first["flatness/lambda_max"] / dominant, 1.0,
                           delta=0.05)
    self.assertTrue(np.isfinite(first["flatness/hessian_trace"]))
    second = tracker.measure()  # Warm start: at least as converged.
    self.assertAlmostEqual(second["flatness/lambda_max"] / dominant, 1.0,
                           delta=0.01)


def setUpModule():
  distribution.logical_cpus(2)  # Before TensorFlow starts up.


if __name__ == "__main__":
  tf.test.main()
