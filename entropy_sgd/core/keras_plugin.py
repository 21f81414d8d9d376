"""Entropy-SGD as an ordinary Keras 3 optimizer (TensorFlow backend).

Switching a Keras pipeline to Entropy-SGD changes only the optimizer:

    model.compile(optimizer=entropy_sgd.core.keras_plugin.EntropySGD(
                      learning_rate=1.0, num_langevin_steps=20, ...),
                  loss=..., metrics=[...])
    model.fit(train_ds, epochs=..., validation_data=...)

Each `fit` step is one minibatch and one gradient evaluation, so a Keras
epoch is one pass over the data: exactly one effective epoch. The optimizer
walks Algorithm 1 as a state machine over its `apply` calls:

* the first call of an outer step takes x and mu from the weights (x', mu
  <- x) and restarts the inner momentum;
* every call is one SGLD step of x' (held in the model's weights) and one
  running-mean step, keyed noise (seed, t, l) as in the Sonnet path;
* the L-th call ends with the outer update, and the weights become the new x.

With `conventions="pytorch_reference"` (outer momentum started from the
gradient at x) each outer step is L + 1 calls: the first only records the
gradient at x, as the reference's extra evaluation does.

The SGLD step is `langevin.langevin_update` (`algorithm.py`'s math, fused
into one memory pass where the CPU kernel applies), shared with
`optimizers.EntropySGD`. So the Keras and Sonnet paths follow the same
trajectory (`keras_plugin_test`).

What Keras sees. Between outer steps the weights are x. In the middle of an
outer step they are x'; `fit` ends with `finalize_variable_values`, which
shows x (x' is kept in the optimizer), so `evaluate`, `predict` and
`model.save` after `fit` see x. The next `fit` spends its first minibatch
putting x' back (its gradient, taken at x, is not used, and no counter
moves, so the noise keys stay aligned). Inside `fit`, validation and
`ModelCheckpoint` at the end of an epoch see x' unless the epoch length is a
multiple of the outer step (L, or L + 1): give `fit` the callback
`EvaluateAtAnchor()`, which shows x while Keras evaluates and saves.
`BackupAndRestore` saves x' with the whole state, so a resumed `fit`
continues exactly.

Counters: `iterations` counts `apply` calls (minibatches, and the step of a
learning-rate schedule of eta); `outer_step` is t and `inner_step` the
position l in the outer step. The logged loss is Keras's: the loss at x'.
"""

import dataclasses
from typing import Union

import keras
import tensorflow as tf

from entropy_sgd.core import algorithm
from entropy_sgd.core import distribution
from entropy_sgd.core import langevin as langevin_lib
from entropy_sgd.core import onednn

# algorithm.py's defaults, the one place they are written.
_DEFAULTS = algorithm.Hyperparameters()

onednn.advise_if_off()  # Keras users import TensorFlow themselves.

_PACKAGE = "entropy_sgd"
_UNSUPPORTED = ("clipnorm", "clipvalue", "global_clipnorm", "use_ema",
                "loss_scale_factor", "gradient_accumulation_steps")

# TensorFlow's operations for `algorithm.py`.
_OPS = langevin_lib.TF_OPS


def _tf(variable):
  """The tf.Variable (or distributed variable) behind a Keras variable."""
  value = variable.value
  if not isinstance(value, tf.Variable):
    raise TypeError(f"Expected a TensorFlow-backed Keras variable; got "
                    f"{type(value).__name__}. Entropy-SGD's Keras optimizer "
                    f"needs KERAS_BACKEND=tensorflow.")
  return value


def _tfs(variables):
  return [_tf(v) for v in variables]


def _read(variables):
  return [v.read_value() for v in variables]


def _assign(variables, values):
  for variable, value in zip(variables, values):
    variable.assign(value)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class EntropySGD(keras.optimizers.Optimizer):
  """Entropy-SGD (Chaudhari et al., ICLR 2017), one minibatch per `fit` step.

  Arguments as `entropy_sgd.core.optimizers.EntropySGD`: `learning_rate` (eta: a
  float or a Keras schedule, stepped per minibatch), `num_langevin_steps`
  (L), `langevin_learning_rate` (eta'), `gamma` (gamma0), `scoping`
  (gamma1), `noise` (eps), `alpha`, `weight_decay` (L2, placed per
  `conventions`), `conventions` ("paper", "lua_reference",
  "pytorch_reference", a `Conventions` or a dict of its fields) and `seed`
  (of the Langevin noise).
  """

  def __init__(self,
               learning_rate=1.0,
               num_langevin_steps: int = _DEFAULTS.num_langevin_steps,
               langevin_learning_rate: float = 0.1,
               gamma: float = _DEFAULTS.gamma,
               scoping: float = _DEFAULTS.scoping,
               noise: float = _DEFAULTS.noise,
               alpha: float = _DEFAULTS.alpha,
               weight_decay: float = _DEFAULTS.weight_decay,
               conventions: Union[str, algorithm.Conventions,
                                  dict] = "paper",
               seed: int = _DEFAULTS.seed,
               name: str = "entropy_sgd",
               **kwargs):
    for unsupported in _UNSUPPORTED:
      if kwargs.get(unsupported) not in (None, False):
        raise ValueError(f"{unsupported} is not supported by Entropy-SGD.")
      kwargs.pop(unsupported, None)
    algorithm.check_positive("learning_rate", learning_rate)
    algorithm.check_positive("langevin_learning_rate", langevin_learning_rate)
    super().__init__(learning_rate=learning_rate, name=name, **kwargs)
    self.hyperparameters = algorithm.Hyperparameters(
        num_langevin_steps=num_langevin_steps, gamma=gamma, scoping=scoping,
        noise=noise, alpha=alpha, weight_decay=weight_decay,
        conventions=algorithm.resolve_conventions(conventions), seed=seed)
    self.langevin_learning_rate = langevin_learning_rate

  num_langevin_steps = property(
      lambda self: self.hyperparameters.num_langevin_steps)
  conventions = property(lambda self: self.hyperparameters.conventions)
  seed = property(lambda self: self.hyperparameters.seed)

  @property
  def steps_per_outer_step(self) -> int:
    """`apply` calls (minibatches) of one outer step: L, or L + 1."""
    return self.hyperparameters.gradient_evaluations_per_step

  def build(self, variables):
    if self.built:
      return
    super().build(variables)
    self._built_for = list(variables)
    c = self.conventions

    def slots(name, wanted=True):
      if not wanted:
        return []
      return [self.add_variable_from_reference(v, name) for v in variables]

    self.anchor = slots("anchor")
    self.mean = slots("mean")
    self.sample = slots("sample")  # x' while the weights show x.
    self.inner_velocities = slots("inner_velocity", c.inner_momentum > 0)
    self.outer_velocities = slots("outer_velocity", c.outer_momentum > 0)

    def counter(name):
      return self.add_variable(shape=(), dtype="int64", name=name,
                               aggregation="only_first_replica")

    self.outer_step = counter("outer_step")
    self.inner_step = counter("inner_step")
    self.shows_anchor = counter("shows_anchor")

  def gamma(self, step=None):
    """gamma_t of outer step `step` (default: the current one), float32."""
    step = _tf(self.outer_step) if step is None else step
    return algorithm.gamma_at(self.hyperparameters, tf.cast(step, tf.int64),
                              tf.zeros([]), _OPS)

  def apply(self, grads, trainable_variables=None):
    """One minibatch of Algorithm 1 (see the module docstring)."""
    grads = list(grads)
    if trainable_variables is None:
      if not self.built:
        raise ValueError("Build the optimizer first, or pass "
                         "trainable_variables.")
      trainable_variables = self._built_for
    trainable_variables = list(trainable_variables)
    if not self.built:
      with keras.name_scope(self.name, caller=self):
        self.build(trainable_variables)
    if len(grads) != len(self.anchor):
      raise ValueError(
          f"EntropySGD was built for {len(self.anchor)} variables and got "
          f"{len(grads)} gradients: pass every trainable variable, every "
          f"step.")
    for gradient, variable in zip(grads, trainable_variables):
      if gradient is None:
        raise ValueError(
            f"The gradient of {variable.path!r} is None: the loss does not "
            f"depend on it. Freeze it (trainable=False) or remove it.")
    gradients = [tf.convert_to_tensor(g) for g in grads]
    replica_context = tf.distribute.get_replica_context()
    if replica_context is not None:  # Keras scaled the loss by 1/replicas.
      gradients = replica_context.all_reduce(tf.distribute.ReduceOp.SUM,
                                             gradients)
    learning_rate = tf.convert_to_tensor(self.learning_rate)
    parameters = _tfs(trainable_variables)
    distribution.update_on_each_device(
        _tf(self.inner_step),
        lambda lr, *g: self._update(parameters, list(g), lr), learning_rate,
        *gradients)
    self.iterations.assign_add(1)

  def _update(self, parameters, gradients, learning_rate):
    """The state machine, on one device's copies."""
    tf.cond(tf.equal(_tf(self.shows_anchor).read_value(), 1),
            lambda: self._restore_sample(parameters),
            lambda: self._step(parameters, gradients, learning_rate))

  def _restore_sample(self, parameters):
    _assign(parameters, _read(_tfs(self.sample)))
    _tf(self.shows_anchor).assign(0)
    return tf.constant(0)

  def _step(self, parameters, gradients, learning_rate):
    hp = self.hyperparameters
    position = _tf(self.inner_step).read_value()
    step = _tf(self.outer_step).read_value()
    anchor, mean = _tfs(self.anchor), _tfs(self.mean)
    inner_velocities = _tfs(self.inner_velocities)
    outer_velocities = _tfs(self.outer_velocities)

    def begin():  # x', mu <- x; the inner momentum restarts.
      # With needs_anchor_gradient, call 0's gradient is the one at x: at
      # t = 0 it starts the outer momentum (Conventions.outer_velocity_init).
      state = algorithm.begin_outer_step(
          hp, _read(parameters), _read(inner_velocities),
          _read(outer_velocities), gradients, tf.equal(step, 0),
          zeros_like=tf.zeros_like, where=tf.where)
      targets = (anchor, mean, inner_velocities, outer_velocities)
      for variables, values in zip(
          targets[:4 if hp.needs_anchor_gradient else 3], state):
        _assign(variables, values)
      return tf.constant(0)

    tf.cond(tf.equal(position, 0), begin, lambda: tf.constant(0))
    if hp.needs_anchor_gradient:
      # Call 0 only records the gradient at x (in `begin`).
      def record():
        _tf(self.inner_step).assign(1)
        return tf.constant(0)

      tf.cond(tf.equal(position, 0), record,
              lambda: self._langevin(parameters, gradients, learning_rate,
                                     step, position - 1))
    else:
      self._langevin(parameters, gradients, learning_rate, step, position)
    return tf.constant(0)

  def _langevin(self, parameters, gradients, learning_rate, step, inner):
    """SGLD step l = `inner` of outer step t = `step`; then, after the
    L-th, the outer update."""
    hp = self.hyperparameters
    anchor, mean = _tfs(self.anchor), _tfs(self.mean)
    inner_velocities = _tfs(self.inner_velocities)
    samples, means, velocities = langevin_lib.langevin_update(
        hp, _read(parameters), _read(anchor), _read(mean), gradients,
        _read(inner_velocities), step=step, inner_step=inner,
        langevin_learning_rate=self.langevin_learning_rate)
    _assign(parameters, samples)
    _assign(mean, means)
    _assign(inner_velocities, velocities)

    def finish():  # x <- x - eta s (x - mu); t <- t + 1.
      outer_velocities = _tfs(self.outer_velocities)
      anchors, new_velocities = algorithm.outer_update(
          hp, _read(anchor), _read(mean), _read(outer_velocities),
          step=step, learning_rate=learning_rate, ops=_OPS)
      _assign(parameters, anchors)
      _assign(outer_velocities, new_velocities)
      _tf(self.outer_step).assign_add(1)
      _tf(self.inner_step).assign(0)
      return tf.constant(0)

    def advance():
      _tf(self.inner_step).assign_add(1)
      return tf.constant(0)

    return tf.cond(tf.equal(inner, hp.num_langevin_steps - 1), finish,
                   advance)

  # ------------------------------------------------ What Keras sees: x.

  @property
  def in_outer_step(self) -> bool:
    """Whether the weights hold x' now (an outer step is under way)."""
    return bool(self.built and int(self.inner_step.numpy()) != 0 and
                int(self.shows_anchor.numpy()) == 0)

  def show_anchor(self, variables):
    """Puts x in the weights, keeping x' for the next `apply`. Eager."""
    if not self.in_outer_step:
      return
    parameters, sample, anchor = (_tfs(variables), _tfs(self.sample),
                                  _tfs(self.anchor))

    def swap():
      _assign(sample, _read(parameters))
      _assign(parameters, _read(anchor))
      _tf(self.shows_anchor).assign(1)

    distribution.update_on_each_device(_tf(self.shows_anchor), swap)

  def show_sample(self, variables):
    """Undoes `show_anchor` (the weights hold x' again). Eager."""
    if not (self.built and int(self.shows_anchor.numpy()) == 1):
      return
    parameters, sample = _tfs(variables), _tfs(self.sample)

    def swap():
      _assign(parameters, _read(sample))
      _tf(self.shows_anchor).assign(0)

    distribution.update_on_each_device(_tf(self.shows_anchor), swap)

  def finalize_variable_values(self, var_list):
    """End of `fit`: the weights show x."""
    self.show_anchor(var_list)

  def get_config(self):
    config = super().get_config()
    hp = self.hyperparameters
    config.update(
        num_langevin_steps=hp.num_langevin_steps,
        langevin_learning_rate=self.langevin_learning_rate,
        gamma=hp.gamma, scoping=hp.scoping, noise=hp.noise, alpha=hp.alpha,
        weight_decay=hp.weight_decay,
        conventions=dataclasses.asdict(hp.conventions), seed=hp.seed)
    for key in _UNSUPPORTED + ("ema_momentum", "ema_overwrite_frequency"):
      config.pop(key, None)
    return config


def _entropy_sgd_of(model):
  optimizer = getattr(model, "optimizer", None)
  optimizer = getattr(optimizer, "inner_optimizer", optimizer)
  return optimizer if isinstance(optimizer, EntropySGD) else None


class EvaluateAtAnchor(keras.callbacks.Callback):
  """Shows x, not x', while `fit` evaluates or saves mid outer step.

  Needed only when an epoch is not a multiple of the outer step: then
  validation, and callbacks listed after this one that read the weights at
  the end of an epoch (`ModelCheckpoint`), see x. Training resumes from x'.
  """

  def _show_anchor(self):
    optimizer = _entropy_sgd_of(self.model)
    if optimizer is not None:
      optimizer.show_anchor(self.model.trainable_variables)

  def _show_sample(self):
    optimizer = _entropy_sgd_of(self.model)
    if optimizer is not None:
      optimizer.show_sample(self.model.trainable_variables)

  def on_test_begin(self, logs=None):
    self._show_anchor()

  def on_test_end(self, logs=None):
    self._show_sample()

  def on_epoch_end(self, epoch, logs=None):
    self._show_anchor()

  def on_epoch_begin(self, epoch, logs=None):
    self._show_sample()


class Diagnostics(keras.callbacks.Callback):
  """Adds Entropy-SGD's scalars to the epoch logs (History, TensorBoard and
  the progress bar show them when they are listed after this callback):
  `gamma` (gamma_t of the current outer step), `outer_step` (t) and
  `anchor_to_mean_distance` (||x - mu|| of the latest outer step)."""

  def on_epoch_end(self, epoch, logs=None):
    optimizer = _entropy_sgd_of(self.model)
    if optimizer is None or logs is None:
      return
    logs["gamma"] = float(optimizer.gamma())
    logs["outer_step"] = int(optimizer.outer_step.numpy())
    logs["anchor_to_mean_distance"] = float(algorithm.distance(
        [v.value for v in optimizer.anchor],
        [v.value for v in optimizer.mean], _OPS))


def _layers(layer):
  """`layer` and every layer inside it, through the public `layers`."""
  yield layer
  for child in getattr(layer, "layers", None) or ():
    yield from _layers(child)


class RecalibrateBatchNorm(keras.callbacks.Callback):
  """Re-estimates BatchNorm moving statistics before each evaluation.

  The BatchNorm statistics were gathered at the Langevin samples x', not at
  x. Before every evaluation (fit's validation and `evaluate`) this callback
  runs `num_batches` forward passes in training mode on `dataset`
  (un-augmented training batches; `(x, y)` or `x`) with no parameter
  update, and sets the moving mean and variance to the exact average over
  those batches. List it after `EvaluateAtAnchor`, if used, so that the
  statistics are those of x.
  """

  def __init__(self, dataset: tf.data.Dataset, num_batches: int = 50):
    super().__init__()
    if num_batches < 1:
      raise ValueError(f"num_batches must be >= 1; got {num_batches}")
    self.dataset = dataset
    self.num_batches = num_batches

  def recalibrate(self):
    layers = [layer for layer in _layers(self.model)
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


__all__ = ["Diagnostics", "EntropySGD", "EvaluateAtAnchor",
           "RecalibrateBatchNorm"]
