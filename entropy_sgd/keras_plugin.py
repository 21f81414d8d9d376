"""Entropy-SGD inside an ordinary Keras 3 `model.fit` pipeline (TF backend).

Switching a Keras pipeline to Entropy-SGD takes three changes:

    esgd = entropy_sgd.keras_plugin.EntropySGD(learning_rate=1.0,
                                        num_langevin_steps=L, ...)
    model.compile(optimizer=esgd, loss=..., metrics=[...])   # was "sgd"
    entropy_sgd.keras_plugin.attach(model)
    model.fit(entropy_sgd.keras_plugin.group_batches(train_ds, L), ...)

* `EntropySGD` is a `keras.optimizers.Optimizer`. It holds the
  hyperparameters, the `Conventions` and the state (anchor x, mean mu,
  momentum buffers; its `iterations` counts outer steps t) as Keras optimizer
  variables, so `ModelCheckpoint`, `BackupAndRestore` and `save_weights` save
  them and `LearningRateScheduler` drives the outer learning rate eta.
* `attach(model)` replaces the model's `train_step`: one fit step is ONE
  outer step of Algorithm 1 over L minibatches (x', mu <- x; L SGLD steps,
  each on its own minibatch, gradients all-reduced over replicas; the outer
  update). It returns the usual metrics (loss and compiled metrics, averaged
  over the inner minibatches of the epoch so far) plus `gamma` and
  `anchor_to_mean_distance` (||x - mu||), so History, the progress bar and
  `TensorBoard` show them. `evaluate`, `predict` and saving are untouched.
* `group_batches(dataset, L)` turns a dataset of batches into one of groups
  of L batches, laid out `[batch, L, ...]` so that `MirroredStrategy` splits
  the batch (not the L inner steps) across replicas.

Mixed precision: under `keras.mixed_precision.set_global_policy(
"mixed_bfloat16")` the layers compute in bfloat16 while their variables, and
so this optimizer's state (made from them) and the Langevin noise added to
x', stay float32; Keras computes the loss in float32. The mixed_float16
policy makes Keras wrap the optimizer in a `LossScaleOptimizer`, which cannot
drive the L-step inner loop: `attach` refuses it (use mixed_bfloat16, or the
Sonnet path's `--precision=mixed_float16` with dynamic loss scaling).

The math is the Sonnet optimizer's: each step calls
`optimizers.EntropySGD._langevin_step_math` / `_outer_step_math` (which call
`updates.py`) and `optimizers.langevin_noise` keyed by (seed, t, l,
parameter index), so both paths follow the same trajectory.
"""

import dataclasses
from typing import Union
import warnings

import keras
from keras.src.losses import loss as keras_loss_lib
import tensorflow as tf

from entropy_sgd import distribution
from entropy_sgd import optimizers

_PACKAGE = "entropy_sgd"


# ------------------------------------------------------------------- Data.


def group_batches(dataset: tf.data.Dataset, num_langevin_steps: int,
                  remainder: str = "drop") -> tf.data.Dataset:
  """Groups L consecutive batches into one element laid out `[batch, L, ...]`.

  Every leaf `t` of the dataset's batches (shape `[B, ...]`) becomes
  `[B, L, ...]`; the Entropy-SGD train step feeds `t[:, l]` to inner step l.

  Args:
    dataset: a dataset of batches (`(x, y)` or `(x, y, sample_weight)`).
    num_langevin_steps: L.
    remainder: what to do when the number of batches is not a multiple of L
      (and with a short last batch): "drop" drops the leftover batches (with
      a warning when the cardinality is known) and a short last batch;
      "error" raises a ValueError when the cardinality shows leftovers.

  Returns:
    The grouped dataset, with cardinality `len(dataset) // L`.

  Raises:
    ValueError: L < 1; fewer than L batches; leftovers with "error".
  """
  if (not isinstance(num_langevin_steps, int) or
      isinstance(num_langevin_steps, bool) or num_langevin_steps < 1):
    raise ValueError(f"num_langevin_steps (L) must be an integer >= 1; got "
                     f"{num_langevin_steps!r}")
  if remainder not in ("drop", "error"):
    raise ValueError(f"remainder must be 'drop' or 'error'; got "
                     f"{remainder!r}")
  L = num_langevin_steps
  cardinality = int(dataset.cardinality())
  if cardinality >= 0:
    if cardinality < L:
      raise ValueError(
          f"The dataset has {cardinality} batches, fewer than the L={L} "
          f"minibatches of one Entropy-SGD step; use more data, smaller "
          f"batches or dataset.repeat().")
    leftover = cardinality % L
    if leftover and remainder == "error":
      raise ValueError(
          f"The dataset has {cardinality} batches, not a multiple of L={L}: "
          f"{leftover} batches would be dropped every epoch. Use "
          f"remainder='drop', dataset.repeat() with steps_per_epoch, or "
          f"dataset.take({cardinality - leftover}).")
    if leftover:
      warnings.warn(
          f"group_batches: {cardinality} batches are not a multiple of "
          f"L={L}; the last {leftover} batches of every pass are dropped.",
          stacklevel=2)
  elif cardinality == tf.data.UNKNOWN_CARDINALITY:
    warnings.warn(
        f"group_batches: unknown dataset length; if it is not a multiple "
        f"of L={L}, the leftover batches of every pass are dropped.",
        stacklevel=2)

  leaves = tf.nest.flatten(dataset.element_spec)
  if any(spec.shape.rank is None or spec.shape.rank < 1 for spec in leaves):
    raise ValueError("group_batches needs batched tensors (rank >= 1); "
                     "batch the dataset first.")
  if any(spec.shape[0] is None for spec in leaves):
    # A short last batch cannot be stacked with full ones: drop any batch
    # whose size differs from the first one.
    def keep_full(first_size, element):
      size = tf.shape(tf.nest.flatten(element)[0], out_type=tf.int64)[0]
      first_size = tf.where(first_size < 0, size, first_size)
      return first_size, (tf.equal(size, first_size), element)

    dataset = dataset.scan(tf.constant(-1, tf.int64), keep_full)
    dataset = dataset.filter(lambda keep, element: keep)
    dataset = dataset.map(lambda keep, element: element)

  def to_batch_major(*element):
    return tf.nest.map_structure(
        lambda t: tf.experimental.numpy.swapaxes(t, 0, 1), element)

  grouped = dataset.batch(L, drop_remainder=True)
  grouped = grouped.map(to_batch_major)
  if not isinstance(dataset.element_spec, tuple):
    grouped = grouped.map(lambda element: element)  # Unwrap 1-tuples.
  return grouped


# -------------------------------------------------------------- Optimizer.


def _conventions(conventions):
  if isinstance(conventions, dict):
    return optimizers.Conventions(**conventions)
  return conventions


@keras.saving.register_keras_serializable(package=_PACKAGE)
class EntropySGD(keras.optimizers.Optimizer):
  """Entropy-SGD (Chaudhari et al., ICLR 2017) for `model.fit`.

  Use with `attach(model)` and a dataset from `group_batches`. The
  arguments are those of `entropy_sgd.optimizers.EntropySGD`, which does
  the math: `learning_rate` (eta; a float or a Keras learning-rate
  schedule of the outer step), `num_langevin_steps` (L),
  `langevin_learning_rate` (eta'), `gamma` (gamma0), `scoping` (gamma1),
  `noise` (eps), `alpha`, `weight_decay` (L2, placed per `conventions`),
  `conventions` ("paper", "lua_reference" or a `Conventions`) and `seed`
  (of the Langevin noise).

  `iterations` counts outer steps t (and is the TensorBoard step).
  """

  def __init__(self,
               learning_rate=1.0,
               num_langevin_steps: int = 20,
               langevin_learning_rate: float = 0.1,
               gamma: float = 0.03,
               scoping: float = 1e-3,
               noise: float = 1e-4,
               alpha: float = 0.75,
               weight_decay: float = 0.0,
               conventions: Union[str, optimizers.Conventions,
                                  dict] = "paper",
               seed: int = 0,
               name: str = "entropy_sgd",
               **kwargs):
    for unsupported in ("clipnorm", "clipvalue", "global_clipnorm",
                        "use_ema", "loss_scale_factor",
                        "gradient_accumulation_steps"):
      if kwargs.get(unsupported) not in (None, False):
        raise ValueError(f"{unsupported} is not supported by Entropy-SGD.")
    super().__init__(learning_rate=learning_rate, name=name, **kwargs)
    float_learning_rate = (learning_rate if isinstance(learning_rate,
                                                       (int, float)) else 1.0)
    # The Sonnet optimizer validates the hyperparameters and owns the math.
    self._rules = optimizers.EntropySGD(
        learning_rate=float_learning_rate,
        num_langevin_steps=num_langevin_steps,
        langevin_learning_rate=langevin_learning_rate, gamma=gamma,
        scoping=scoping, noise=noise, alpha=alpha, weight_decay=weight_decay,
        conventions=_conventions(conventions), seed=seed, name=name)
    if self._rules.needs_anchor_gradient:
      raise ValueError(
          "These conventions (outer_velocity_init='anchor_gradient' with "
          "outer momentum, e.g. the pytorch_reference preset) need one more "
          "minibatch per step, a gradient at x, which the Keras plugin does "
          "not feed; use entropy_sgd.train_step.make_train_step, or "
          "dataclasses.replace(optimizers.PYTORCH_REFERENCE, "
          "outer_velocity_init='zero').")
    self._conventions_arg = conventions
    self._state_built = False

  # Hyperparameters, read-only.
  num_langevin_steps = property(lambda self: self._rules.num_langevin_steps)
  conventions = property(lambda self: self._rules.conventions)
  seed = property(lambda self: self._rules.seed)

  def build(self, variables):
    if self.built:
      return
    super().build(variables)
    c = self._rules.conventions
    self.anchor = [self.add_variable_from_reference(v, "anchor")
                   for v in variables]
    self.mean = [self.add_variable_from_reference(v, "mean")
                 for v in variables]
    self.inner_velocities = (
        [self.add_variable_from_reference(v, "inner_velocity")
         for v in variables] if c.inner_momentum > 0 else [])
    self.outer_velocities = (
        [self.add_variable_from_reference(v, "outer_velocity")
         for v in variables] if c.outer_momentum > 0 else [])
    self._num_parameters = len(variables)

  def gamma(self, step=None):
    """gamma_t of outer step `step` (default: the current one)."""
    return self._rules.gamma(self.iterations if step is None else step)

  # Keras' single-gradient path is not Entropy-SGD: refuse it clearly.
  def apply(self, grads, trainable_variables=None):
    raise RuntimeError(
        "EntropySGD takes L minibatches per step and cannot be used through "
        "optimizer.apply/apply_gradients: call "
        "entropy_sgd.keras_plugin.attach(model) after model.compile(optimizer="
        "EntropySGD(...)) and feed model.fit with "
        "entropy_sgd.keras_plugin.group_batches(dataset, L).")

  def update_step(self, gradient, variable, learning_rate):
    self.apply([gradient], [variable])

  # The three phases of one outer step, on tf.Variables (`.value`s of the
  # model's Keras variables). They run on every device that holds a copy.

  def _update(self, update_fn, *args):
    distribution.update_on_each_device(_tf(self.iterations), update_fn, *args)

  def begin_outer_step(self, parameters):
    """x', mu <- x; restarts the inner momentum."""
    anchor, mean = _tfs(self.anchor), _tfs(self.mean)
    velocities = _tfs(self.inner_velocities)

    def restart():
      values = [p.read_value() for p in parameters]
      for a, m, value in zip(anchor, mean, values):
        a.assign(value)
        m.assign(value)
      for v in velocities:
        v.assign(tf.zeros_like(v))

    self._update(restart)

  def langevin_step(self, gradients, parameters, inner_step):
    """One SGLD step with the (all-reduced) `gradients`; l = `inner_step`."""
    anchor, mean = _tfs(self.anchor), _tfs(self.mean)
    velocities = _tfs(self.inner_velocities)
    step = _tf(self.iterations)

    def update(inner_step, *gradients):
      samples, means, new_velocities = self._rules._langevin_step_math(  # pylint: disable=protected-access
          _read(parameters), _read(anchor), _read(mean), list(gradients),
          _read(velocities), step.read_value(), inner_step,
          noise_stream=tf.constant(0, tf.int64))
      _assign(parameters, samples)
      _assign(mean, means)
      _assign(velocities, new_velocities)

    self._update(update, inner_step, *gradients)

  def end_outer_step(self, parameters):
    """x <- x - eta * s * (x - mu); t <- t + 1. Returns the diagnostics."""
    anchor, mean = _tfs(self.anchor), _tfs(self.mean)
    velocities = _tfs(self.outer_velocities)
    step = _tf(self.iterations)
    learning_rate = tf.convert_to_tensor(self.learning_rate)
    anchors, means = _read(anchor), _read(mean)
    metrics = {
        "gamma": self.gamma(step.read_value()),
        "anchor_to_mean_distance": tf.sqrt(tf.add_n(
            [tf.reduce_sum(tf.square(x - mu))
             for x, mu in zip(anchors, means)])),
    }

    def update(learning_rate):
      self._rules.learning_rate = learning_rate
      new_anchors, new_velocities = self._rules._outer_step_math(  # pylint: disable=protected-access
          _read(anchor), _read(mean), _read(velocities), step.read_value())
      _assign(parameters, new_anchors)
      _assign(velocities, new_velocities)
      step.assign_add(1)

    self._update(update, learning_rate)
    return metrics

  def get_config(self):
    config = super().get_config()
    rules = self._rules
    conventions = self._conventions_arg
    if isinstance(conventions, optimizers.Conventions):
      conventions = dataclasses.asdict(conventions)
    config.update(
        num_langevin_steps=rules.num_langevin_steps,
        langevin_learning_rate=rules.langevin_learning_rate,
        gamma=rules.gamma0, scoping=rules.scoping, noise=rules.noise,
        alpha=rules.alpha, weight_decay=rules.weight_decay,
        conventions=conventions, seed=rules.seed)
    for key in ("clipnorm", "clipvalue", "global_clipnorm", "use_ema",
                "ema_momentum", "ema_overwrite_frequency",
                "loss_scale_factor", "gradient_accumulation_steps"):
      config.pop(key, None)
    config.pop("weight_decay_keras", None)
    return config


def _tf(variable):
  """The tf.Variable (or distributed variable) behind a Keras variable."""
  value = variable.value
  if not isinstance(value, tf.Variable):
    raise TypeError(f"Expected a TensorFlow-backed Keras variable; got "
                    f"{type(value).__name__}. Entropy-SGD's Keras plugin "
                    f"needs KERAS_BACKEND=tensorflow and no autocasting.")
  return value


def _tfs(variables):
  return [_tf(v) for v in variables]


def _read(variables):
  return [v.read_value() for v in variables]


def _assign(variables, values):
  for variable, value in zip(variables, values):
    variable.assign(value)


# ------------------------------------------------------------ Train step.


def _inner_slice(data, inner_step):
  return tf.nest.map_structure(
      lambda t: None if t is None else tf.gather(t, inner_step, axis=1), data)


def _entropy_sgd_train_step(model, data):
  """One Entropy-SGD outer step of `model` on one `group_batches` element."""
  # pylint: disable=protected-access
  optimizer = model.optimizer
  if not isinstance(optimizer, EntropySGD):
    raise ValueError(
        f"attach(model) needs model.compile(optimizer=entropy_sgd.keras_plugin."
        f"EntropySGD(...)); the model's optimizer is "
        f"{type(optimizer).__name__}.")
  L = optimizer.num_langevin_steps
  x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
  for t in tf.nest.flatten((x, y, sample_weight)):
    if t is not None and (t.shape.rank is None or t.shape.rank < 2 or
                          t.shape[1] != L):
      raise ValueError(
          f"Entropy-SGD takes L={L} minibatches per step: feed model.fit "
          f"with entropy_sgd.keras_plugin.group_batches(dataset, {L}), whose "
          f"tensors are shaped [batch, L, ...]; got a tensor of shape "
          f"{t.shape}.")
  keras_parameters = list(model.trainable_variables)
  parameters = _tfs(keras_parameters)
  if not optimizer.built:
    raise ValueError("Call entropy_sgd.keras_plugin.attach(model) after compile.")
  if len(parameters) != optimizer._num_parameters:
    raise ValueError("The model's trainable variables changed after the "
                     "optimizer was built.")
  replica_context = tf.distribute.get_replica_context()

  optimizer.begin_outer_step(parameters)

  def inner_step(l, total_loss):
    x_l, y_l, w_l = _inner_slice((x, y, sample_weight), l)
    with tf.GradientTape() as tape:
      if model._call_has_training_arg:
        y_pred = model(x_l, training=True)
      else:
        y_pred = model(x_l)
      loss = model._compute_loss(x=x_l, y=y_l, y_pred=y_pred,
                                 sample_weight=w_l, training=True)
    unscaled = keras_loss_lib.unscale_loss_for_distribution(loss)
    model._loss_tracker.update_state(
        unscaled, sample_weight=tf.shape(tf.nest.flatten(x_l)[0])[0])
    gradients = tape.gradient(loss, keras_parameters)
    for gradient, parameter in zip(gradients, keras_parameters):
      if gradient is None:
        raise ValueError(
            f"The gradient of {parameter.path!r} is None: the loss does not "
            f"depend on it. Freeze it (trainable=False) or remove it.")
    gradients = [tf.convert_to_tensor(g) for g in gradients]
    if replica_context is not None:
      gradients = replica_context.all_reduce(tf.distribute.ReduceOp.SUM,
                                             gradients)
    optimizer.langevin_step(gradients, parameters,
                            tf.cast(l, tf.int64))
    model.compute_metrics(x_l, y_l, y_pred, sample_weight=w_l)
    return l + 1, total_loss + unscaled

  # merge_call (the per-device update) cannot sit inside a tf.while_loop in
  # a replica of MirroredStrategy & co: unroll the L inner steps there.
  if _UNROLL or tf.distribute.has_strategy():
    total = tf.constant(0.0)
    for l in range(L):
      _, total = inner_step(tf.constant(l), total)
  else:
    _, total = tf.while_loop(lambda l, _: l < L, inner_step,
                             (tf.constant(0), tf.constant(0.0)))
  del total
  diagnostics = optimizer.end_outer_step(parameters)
  logs = dict(model.get_metrics_result())
  logs.update(diagnostics)
  return logs


_UNROLL = False


def attach(model: keras.Model) -> keras.Model:
  """Makes each `model.fit` step one Entropy-SGD outer step; returns `model`.

  Call after `model.compile(optimizer=EntropySGD(...), ...)` on a built
  model (inside the strategy scope, if any), and feed `fit` a
  dataset from `group_batches(dataset, L)`. Nothing else changes: evaluate,
  predict, callbacks, saving and `MirroredStrategy` work as usual.

  Raises:
    ValueError: the model is not built, has no trainable weights or was not
      compiled with `EntropySGD`.
  """
  if not isinstance(model, keras.Model):
    raise TypeError(f"attach needs a keras.Model; got {type(model).__name__}.")
  if not model.built:
    raise ValueError("Build the model before attach (call it on a batch or "
                     "give it an Input).")
  if not model.trainable_variables:
    raise ValueError("The model has no trainable weights: Entropy-SGD has "
                     "nothing to train.")
  optimizer = getattr(model, "optimizer", None)
  if isinstance(getattr(optimizer, "inner_optimizer", None), EntropySGD):
    raise ValueError(
        "The mixed_float16 policy is not supported: Keras wrapped "
        "EntropySGD in a LossScaleOptimizer, whose one-gradient update "
        "cannot drive Entropy-SGD's L-step inner loop. Use "
        "keras.mixed_precision.set_global_policy('mixed_bfloat16') (no loss "
        "scaling needed), or the Sonnet launchers' --precision=mixed_float16,"
        " which scale the loss dynamically.")
  if not isinstance(optimizer, EntropySGD):
    raise ValueError(
        "Call model.compile(optimizer=entropy_sgd.keras_plugin.EntropySGD(...), "
        "...) before attach(model); the model's optimizer is "
        f"{type(optimizer).__name__}.")
  if not optimizer.built:
    with model.distribute_strategy.scope():
      optimizer.build(model.trainable_variables)
  # The compiled noise kernel cannot run in an XLA-compiled train step.
  if getattr(model, "jit_compile", False) is not False:
    optimizer._rules.use_noise_kernel = False  # pylint: disable=protected-access
  model.train_step = lambda data: _entropy_sgd_train_step(model, data)
  model.train_function = None
  _slice_symbolic_build_in_fit(model, optimizer.num_langevin_steps)
  return model


def _slice_symbolic_build_in_fit(model, num_langevin_steps):
  """Under a strategy, Keras builds metrics and losses from the first
  element of the training data before tracing: show it one minibatch of
  the `[batch, L, ...]` group instead of the whole group."""
  # pylint: disable=protected-access
  if getattr(model, "_entropy_sgd_attached", False):
    return
  model._entropy_sgd_attached = True
  fitting = []
  symbolic_build = model._symbolic_build
  fit = model.fit

  def sliced_symbolic_build(iterator=None, data_batch=None):
    if fitting and data_batch is not None:
      leaves = [t for t in tf.nest.flatten(data_batch) if t is not None]
      if all(len(t.shape) >= 2 and t.shape[1] == num_langevin_steps
             for t in leaves):
        data_batch = tf.nest.map_structure(
            lambda t: None if t is None else t[:, 0], data_batch)
    return symbolic_build(iterator=iterator, data_batch=data_batch)

  def fit_with_groups(*args, **kwargs):
    fitting.append(True)
    try:
      return fit(*args, **kwargs)
    finally:
      fitting.pop()

  model._symbolic_build = sliced_symbolic_build
  model.fit = fit_with_groups


# ---------------------------------------------------------------- Callbacks.


class RecalibrateBatchNorm(keras.callbacks.Callback):
  """Re-estimates BatchNorm moving statistics before each evaluation.

  After Entropy-SGD's outer step the weights are x, but the BatchNorm
  statistics were gathered at the Langevin samples x'. Before every
  evaluation (fit's validation and `evaluate`) this callback runs
  `num_batches` forward passes in training mode on `dataset` (un-augmented
  training batches; `(x, y)` or `x`) with no parameter update, and sets the
  moving mean and variance to the exact average over those batches.
  """

  def __init__(self, dataset: tf.data.Dataset, num_batches: int = 50):
    super().__init__()
    if num_batches < 1:
      raise ValueError(f"num_batches must be >= 1; got {num_batches}")
    self.dataset = dataset
    self.num_batches = num_batches

  def recalibrate(self):
    layers = [layer for layer in self.model._flatten_layers()  # pylint: disable=protected-access
              if isinstance(layer, keras.layers.BatchNormalization)]
    if not layers:
      return
    momenta = [layer.momentum for layer in layers]
    try:
      for k, batch in enumerate(self.dataset.take(self.num_batches)):
        inputs = batch[0] if isinstance(batch, tuple) else batch
        for layer in layers:
          layer.momentum = 1.0 - 1.0 / (k + 1)  # Cumulative average.
        self.model(inputs, training=True)
    finally:
      for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum

  def on_test_begin(self, logs=None):
    self.recalibrate()


__all__ = ["EntropySGD", "RecalibrateBatchNorm", "attach", "group_batches"]
