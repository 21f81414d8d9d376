"""Entropy-SGD and its SGD baselines as Sonnet 2 modules.

All optimizers share one interface, so one training step drives them all:

    optimizer.initialize(parameters)          # once, inside strategy.scope()
    optimizer.begin_outer_step(parameters)    # (see needs_anchor_gradient)
    for _ in range(optimizer.apply_calls_per_step):
      optimizer.apply(gradients_on_a_fresh_minibatch, parameters)
    metrics = optimizer.end_outer_step(parameters)

When `optimizer.needs_anchor_gradient` (only the `pytorch_reference`
conventions, with outer momentum), the outer step also needs the gradient at
x on a minibatch of its own, before the inner loop:
`begin_outer_step(parameters, anchor_gradients)`. `gradient_evaluations_per_step`
counts every minibatch an outer step consumes, that one included.

For SGD the "outer step" is one gradient step. For Entropy-SGD it is one
iteration of Algorithm 1 (Chaudhari et al., ICLR 2017): `begin_outer_step`
sets x' = mu = x, each `apply` is one SGLD step of the inner loop and
`end_outer_step` moves x along the local-entropy gradient. The update math
lives in `algorithm.py` (Entropy-SGD) and `updates.py` (the baselines); here
live the state variables, created once and placed like their parameters,
and the distribution plumbing.

They work under the default strategy, `MirroredStrategy` and `TPUStrategy`:
`apply` may be called in replica context with all-reduced gradients, and
every replica then applies the same update to its own copies.
"""

import dataclasses
from typing import Mapping, Optional, Sequence, Union

import sonnet as snt
import tensorflow as tf

from entropy_sgd.core import algorithm
from entropy_sgd.core import distribution
from entropy_sgd.core import langevin as langevin_lib
from entropy_sgd.core import noise as noise_lib
from entropy_sgd.core import updates as update_rules

# algorithm.py's defaults, the one place they are written.
_DEFAULTS = algorithm.Hyperparameters()

FloatLike = Union[float, tf.Variable, tf.Tensor]


_check_choice = algorithm.check_choice
_check_range = algorithm.check_range
_check_positive = algorithm.check_positive
_check_non_negative = algorithm.check_non_negative


_as_dtype = langevin_lib.as_dtype


# The conventions and their presets live with the math, in `algorithm.py`.
Conventions = algorithm.Conventions
PAPER = algorithm.PAPER
LUA_REFERENCE = algorithm.LUA_REFERENCE
PYTORCH_REFERENCE = algorithm.PYTORCH_REFERENCE
PRESETS = algorithm.PRESETS

# TensorFlow's operations for `algorithm.py`.
TF_OPS = langevin_lib.TF_OPS


# N(0, I) noise of one SGLD step for all parameters, keyed by (seed, stream,
# t, l) and the parameter's position; see `noise.py`. `stream` separates
# independent chains (Parle's replicas); the synchronous optimizer uses 0.
langevin_noise = noise_lib.langevin_noise


def _state_like(parameter, name, trainable=False):
  """A zero variable shaped like `parameter` and placed like it."""
  initial_value = tf.zeros(parameter.shape, parameter.dtype)
  if tf.distribute.has_strategy():
    return tf.Variable(initial_value, trainable=trainable, name=name)
  with tf.device(parameter.device):
    return tf.Variable(initial_value, trainable=trainable, name=name)


def _counter(name):
  return tf.Variable(
      tf.constant(0, tf.int64),
      trainable=False,
      name=name,
      aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


def _maybe_jit(fn, jit_compile):
  return tf.function(fn, jit_compile=True) if jit_compile else fn


def _read(variables):
  return [v.read_value() for v in variables]


def _assign(variables, values):
  for variable, value in zip(variables, values):
    variable.assign(value)


class Optimizer(snt.Module):
  """Shared interface and checks; subclasses define the per-device math."""

  # Gradient evaluations one outer step makes, all of them.
  gradient_evaluations_per_step = 1
  # Whether it is SAM-like: the train step takes the gradient at w, calls
  # `perturb`, then takes the gradient of the same batch and calls `apply`.
  perturbs_before_apply = False
  # Whether one of them is the gradient at x, taken before the inner loop and
  # passed to `begin_outer_step(parameters, anchor_gradients)`; the others go
  # to `apply`. Only Entropy-SGD with `outer_velocity_init="anchor_gradient"`
  # and outer momentum sets it.
  needs_anchor_gradient = False
  # Whether `apply` expects gradients summed over replicas (synchronous
  # training); Parle's replicas each follow their own gradients.
  all_reduces_gradients = True
  # The scalar metrics `end_outer_step` returns: name -> TensorBoard tag.
  diagnostics: Mapping[str, str] = {}

  def __init__(self, jit_compile: bool, name: Optional[str]):
    super().__init__(name=name)
    self.jit_compile = jit_compile
    self.step = None  # Outer steps taken; an int64 variable.
    self._parameter_signature = None

  def initialize(self, parameters: Sequence[tf.Variable]):
    """Creates the state, once. Call inside `strategy.scope()`."""
    if self._parameter_signature is not None:
      self._check_parameters(parameters)
      return
    if not parameters:
      raise ValueError("`parameters` cannot be empty.")
    if not tf.distribute.in_cross_replica_context() and (
        tf.distribute.has_strategy()):
      raise RuntimeError(
          "Optimizer state must be created outside the replica function: "
          "call optimizer.initialize(parameters) inside strategy.scope() "
          "before strategy.run.")
    self._parameter_signature = [(p.shape, p.dtype) for p in parameters]
    with self.name_scope:
      self.step = _counter("step")
      self._create_state(parameters)

  @property
  def apply_calls_per_step(self) -> int:
    """Calls of `apply` per outer step: L for Entropy-SGD, 1 for SGD/SAM."""
    return (self.gradient_evaluations_per_step - int(self.needs_anchor_gradient)
            - int(self.perturbs_before_apply))

  @property
  def batches_per_step(self) -> int:
    """Minibatches one outer step consumes (SAM: 1 for 2 evaluations)."""
    return self.gradient_evaluations_per_step - int(self.perturbs_before_apply)

  def begin_outer_step(self, parameters: Sequence[tf.Variable],
                       anchor_gradients: Optional[Sequence[tf.Tensor]] = None):
    """Prepares one outer step (no-op for SGD).

    `anchor_gradients` (dL/dx at the current weights, on a minibatch of its
    own) is needed when `needs_anchor_gradient` and ignored otherwise.
    """
    del anchor_gradients
    self._check_parameters(parameters)

  def apply(self, updates: Sequence[tf.Tensor],
            parameters: Sequence[tf.Variable]):
    """Applies one gradient evaluation: `updates[i]` is dL/d`parameters[i]`.

    May be called in replica context with all-reduced gradients.
    """
    self._check_parameters(parameters)
    self._check_updates(updates, parameters)
    distribution.update_on_each_device(
        self.step, lambda *g: self._apply_on_device(list(g), parameters),
        *updates)

  def skip_apply(self, parameters: Sequence[tf.Variable]):
    """Counts one `apply` call whose update is skipped; changes no state.

    For an overflowed float16 gradient (`train_step` with loss scaling):
    only the counter `apply` advances moves (SGD's step; Entropy-SGD's
    inner step l, so later SGLD steps keep their noise keys).
    """
    self._check_parameters(parameters)
    counter = self._apply_counter()
    distribution.update_on_each_device(self.step,
                                       lambda: counter.assign_add(1))

  def _apply_counter(self) -> tf.Variable:
    """The counter one `apply` call advances."""
    return self.step

  def end_outer_step(
      self, parameters: Sequence[tf.Variable]) -> Mapping[str, tf.Tensor]:
    """Finishes one outer step and returns scalar diagnostics."""
    self._check_parameters(parameters)
    distribution.update_on_each_device(
        self.step, lambda: self.step.assign_add(1))
    return {}

  def _check_parameters(self, parameters):
    if self._parameter_signature is None:
      raise RuntimeError(
          "Call optimizer.initialize(parameters) first (inside "
          "strategy.scope() when using a distribution strategy).")
    signature = [(p.shape, p.dtype) for p in parameters]
    if signature != self._parameter_signature:
      raise ValueError(
          f"`parameters` ({len(signature)} variables) do not match those "
          f"the optimizer was initialized with "
          f"({len(self._parameter_signature)} variables); pass the same "
          f"list, in the same order, every time.")

  def _check_updates(self, updates, parameters):
    if len(updates) != len(parameters):
      raise ValueError(
          f"`updates` and `parameters` must be the same length; got "
          f"{len(updates)} updates for {len(parameters)} parameters.")
    for update, parameter in zip(updates, parameters):
      if update is None:
        raise ValueError(
            f"The gradient of parameter {parameter.name!r} is None: the "
            f"loss does not depend on it. Pass only the parameters the loss "
            f"uses.")
      if isinstance(update, tf.IndexedSlices):
        raise ValueError(
            f"Sparse (IndexedSlices) gradient for {parameter.name!r}; "
            f"convert it with tf.convert_to_tensor first.")
      if update.dtype != parameter.dtype:
        raise ValueError(
            f"The gradient of {parameter.name!r} has dtype "
            f"{update.dtype.name}, the parameter {parameter.dtype.name}.")
      if not update.shape.is_compatible_with(parameter.shape):
        raise ValueError(
            f"The gradient of {parameter.name!r} has shape {update.shape}, "
            f"the parameter {parameter.shape}.")

  def _create_state(self, parameters):
    raise NotImplementedError

  def _apply_on_device(self, gradients, parameters):
    raise NotImplementedError


class SGD(Optimizer):
  """SGD with optional (Nesterov) momentum and L2 weight decay.

      d <- g + weight_decay * x
      v <- momentum * v + d;  d <- d + momentum * v (Nesterov) or v
      x <- x - learning_rate * d
  """

  def __init__(self,
               learning_rate: FloatLike,
               momentum: float = 0.0,
               nesterov: bool = False,
               weight_decay: float = 0.0,
               jit_compile: bool = False,
               name: Optional[str] = None):
    super().__init__(jit_compile, name)
    _check_positive("learning_rate", learning_rate)
    _check_range("momentum", momentum, 0.0, 1.0)
    _check_non_negative("weight_decay", weight_decay)
    if nesterov and not momentum > 0:
      raise ValueError("Nesterov momentum needs momentum > 0.")
    self.learning_rate = learning_rate
    self.momentum = momentum
    self.nesterov = nesterov
    self.weight_decay = weight_decay
    self.velocities = []
    self._math = _maybe_jit(self._step_math, jit_compile)

  def _create_state(self, parameters):
    if self.momentum > 0:
      self.velocities = [
          _state_like(p, f"velocity_{i}") for i, p in enumerate(parameters)]

  def _step_math(self, parameters, gradients, velocities):
    new_parameters, new_velocities = [], []
    for i, (x, g) in enumerate(zip(parameters, gradients)):
      x, v = update_rules.sgd_step(
          x, g, velocities[i] if velocities else None,
          learning_rate=_as_dtype(self.learning_rate, x.dtype),
          weight_decay=self.weight_decay,
          momentum=self.momentum,
          nesterov=self.nesterov)
      new_parameters.append(x)
      new_velocities.append(v)
    return new_parameters, new_velocities if velocities else []

  def _descent_start(self, parameters):
    """The weights the step descends from (SAM: the unperturbed ones)."""
    return _read(parameters)

  def _apply_on_device(self, gradients, parameters):
    new_parameters, new_velocities = self._math(
        self._descent_start(parameters), gradients, _read(self.velocities))
    _assign(parameters, new_parameters)
    _assign(self.velocities, new_velocities)
    self.step.assign_add(1)

  def end_outer_step(self, parameters):
    self._check_parameters(parameters)  # `apply` already counted the step.
    return {}


class Adam(Optimizer):
  """Adam (Kingma & Ba, 2015) as Torch's `optim.adam`, with coupled L2.

  The paper's MNIST baseline (Chaudhari et al., ICLR 2017, Sec. 5.1) ran
  Torch's Adam; `updates.adam_step` gives the math, including where epsilon
  goes. Defaults are `optim.adam`'s: beta1 0.9, beta2 0.999, epsilon 1e-8.
  """

  def __init__(self,
               learning_rate: FloatLike,
               beta1: float = 0.9,
               beta2: float = 0.999,
               epsilon: float = 1e-8,
               weight_decay: float = 0.0,
               jit_compile: bool = False,
               name: Optional[str] = None):
    super().__init__(jit_compile, name)
    _check_positive("learning_rate", learning_rate)
    _check_range("beta1", beta1, 0.0, 1.0)
    _check_range("beta2", beta2, 0.0, 1.0)
    _check_positive("epsilon", epsilon)
    _check_non_negative("weight_decay", weight_decay)
    self.learning_rate = learning_rate
    self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon
    self.weight_decay = weight_decay
    self.first_moments, self.second_moments = [], []
    self._math = _maybe_jit(self._step_math, jit_compile)

  def _create_state(self, parameters):
    self.first_moments = [_state_like(p, f"first_moment_{i}")
                          for i, p in enumerate(parameters)]
    self.second_moments = [_state_like(p, f"second_moment_{i}")
                           for i, p in enumerate(parameters)]

  def _step_math(self, parameters, gradients, first_moments, second_moments,
                 step):
    results = [
        update_rules.adam_step(
            x, g, m, v, step,
            learning_rate=_as_dtype(self.learning_rate, x.dtype),
            beta1=self.beta1, beta2=self.beta2, epsilon=self.epsilon,
            weight_decay=self.weight_decay)
        for x, g, m, v in zip(parameters, gradients, first_moments,
                              second_moments)]
    return [list(column) for column in zip(*results)]

  def _apply_on_device(self, gradients, parameters):
    new_parameters, new_first, new_second = self._math(
        _read(parameters), gradients, _read(self.first_moments),
        _read(self.second_moments), self.step.read_value() + 1)
    _assign(parameters, new_parameters)
    _assign(self.first_moments, new_first)
    _assign(self.second_moments, new_second)
    self.step.assign_add(1)

  def end_outer_step(self, parameters):
    self._check_parameters(parameters)  # `apply` already counted the step.
    return {}


SAM_PERTURBATIONS = ("per_replica", "synchronized")


class SAM(SGD):
  """Sharpness-aware minimisation (Foret et al., ICLR 2021) and ASAM.

  One step takes two gradients on the same minibatch:

      g   = grad f(w)                    (the train step's first pass)
      eps = rho g/||g||  (ASAM: rho T^2 g/||T g||, T = |w| + eta)
      g'  = grad f(w + eps)              (second pass; `perturb` moved w)
      w  <- the SGD/Nesterov step from w on g' (with its weight decay)

  `perturb` keeps w itself, not eps, so the descent starts from w exactly
  and per-replica perturbations leave the replicas bit-identical.

  The train step calls `perturb(g, parameters)` after the first pass and
  `apply(g', parameters)` after the second; BatchNorm statistics keep what
  the first pass made of them (`train_step`). Under several replicas,
  `perturbation="per_replica"` perturbs each replica by its own gradient
  (m-sharpness with m = the per-replica batch, as Foret et al. ran it on
  TPU cores, their Sec. 4.1), and "synchronized" by the all-reduced one;
  g' is all-reduced either way, so the replicas stay identical.
  """

  gradient_evaluations_per_step = 2
  perturbs_before_apply = True

  def __init__(self,
               learning_rate: FloatLike,
               rho: float = 0.05,
               adaptive: bool = False,
               eta: float = 0.01,
               momentum: float = 0.9,
               nesterov: bool = True,
               weight_decay: float = 0.0,
               perturbation: str = "per_replica",
               jit_compile: bool = False,
               name: Optional[str] = None):
    super().__init__(learning_rate, momentum=momentum, nesterov=nesterov,
                     weight_decay=weight_decay, jit_compile=jit_compile,
                     name=name)
    _check_positive("rho", rho)
    _check_non_negative("eta", eta)
    _check_choice("perturbation", perturbation, SAM_PERTURBATIONS)
    self.rho, self.adaptive, self.eta = rho, adaptive, eta
    self.perturbation = perturbation
    # The unperturbed weights w while the model holds w + eps.
    self.unperturbed = []
    self._perturb_math = _maybe_jit(self._perturbation_math, jit_compile)

  @property
  def all_reduces_first_gradient(self) -> bool:
    return self.perturbation == "synchronized"

  def _create_state(self, parameters):
    super()._create_state(parameters)
    self.unperturbed = [_state_like(p, f"unperturbed_{i}")
                        for i, p in enumerate(parameters)]

  def _perturbation_math(self, parameters, gradients):
    return update_rules.sam_perturbations(
        parameters, gradients, rho=self.rho, adaptive=self.adaptive,
        eta=self.eta)

  def perturb(self, gradients: Sequence[tf.Tensor],
              parameters: Sequence[tf.Variable]):
    """w <- w + eps(g): call in replica context with this replica's (or the
    all-reduced) gradient at w."""
    self._check_parameters(parameters)
    self._check_updates(gradients, parameters)

    def on_device(*local_gradients):
      weights = _read(parameters)
      perturbations = self._perturb_math(weights, list(local_gradients))
      _assign(self.unperturbed, weights)
      _assign(parameters, [w + e for w, e in zip(weights, perturbations)])

    distribution.update_on_each_device(self.step, on_device, *gradients)

  def _descent_start(self, parameters):
    return _read(self.unperturbed)


class EntropySGD(Optimizer):
  """Entropy-SGD, Algorithm 1 of Chaudhari et al. (ICLR 2017).

  One outer step, on weights x:

      gamma <- gamma0 * (1 + gamma1)**(t + scoping_offset)
      x', mu <- x                                         (`begin_outer_step`)
      for l = 1..L, each on a fresh minibatch:            (`apply`)
        dx' <- grad f(x') + wd * x' - gamma * (x - x')
        x'  <- x' - eta' * dx' + noise_std * N(0, I)
        mu  <- (1 - alpha) * mu + alpha * x'
      x <- x - eta * s * (x - mu)                         (`end_outer_step`)

  The paper's conventions are the default; `conventions="lua_reference"`
  reproduces the code that produced the paper's numbers. See `Conventions`.
  Noise is drawn from a stateless RNG keyed by (seed, t, l, parameter); see
  `noise.py`. With `noise=0` nothing is drawn.

  The model's variables hold x' during the inner loop and x after
  `end_outer_step`; `anchor` holds x and `mean` holds mu meanwhile.
  """

  diagnostics = {"gamma": "entropy_sgd/gamma",
                 "anchor_to_mean_distance":
                     "entropy_sgd/anchor_to_mean_distance"}

  def __init__(self,
               learning_rate: FloatLike = 1.0,
               num_langevin_steps: int = _DEFAULTS.num_langevin_steps,
               langevin_learning_rate: FloatLike = 0.1,
               gamma: float = _DEFAULTS.gamma,
               scoping: float = _DEFAULTS.scoping,
               noise: float = _DEFAULTS.noise,
               alpha: float = _DEFAULTS.alpha,
               weight_decay: float = _DEFAULTS.weight_decay,
               conventions: Union[str, Conventions] = "paper",
               seed: int = _DEFAULTS.seed,
               jit_compile: bool = False,
               name: Optional[str] = None):
    """Constructs Entropy-SGD.

    Args:
      learning_rate: eta, the outer step size.
      num_langevin_steps: L, SGLD steps (gradient evaluations) per update.
      langevin_learning_rate: eta', the SGLD step size.
      gamma: gamma0, the initial scope (coupling of x' to x).
      scoping: gamma1; gamma grows by a factor (1 + gamma1) per outer step.
      noise: eps, the thermal noise of the SGLD steps.
      alpha: weight of the running mean; see `Conventions.alpha_weights`.
      weight_decay: L2 weight decay, see `Conventions.inner_weight_decay`.
      conventions: a `Conventions` or the name of one of `PRESETS`.
      seed: seed of the Langevin noise.
      jit_compile: compile the per-device update math with XLA.
      name: module name.
    """
    super().__init__(jit_compile, name)
    _check_positive("learning_rate", learning_rate)
    _check_positive("langevin_learning_rate", langevin_learning_rate)
    self.hyperparameters = algorithm.Hyperparameters(
        num_langevin_steps=num_langevin_steps, gamma=gamma, scoping=scoping,
        noise=noise, alpha=alpha, weight_decay=weight_decay,
        conventions=algorithm.resolve_conventions(conventions), seed=seed)
    self.learning_rate = learning_rate
    self.langevin_learning_rate = langevin_learning_rate
    self.needs_anchor_gradient = self.hyperparameters.needs_anchor_gradient
    self.gradient_evaluations_per_step = (
        self.hyperparameters.gradient_evaluations_per_step)
    self.anchor, self.mean = [], []
    self.inner_velocities, self.outer_velocities = [], []
    self.inner_step = None
    # The compiled CPU noise kernel cannot run inside XLA: None lets
    # `noise.standard_normal` decide, False keeps TensorFlow's ops.
    self.use_noise_kernel = False if jit_compile else None
    # The fused SGLD step (`langevin.py`): None where the kernel is used,
    # False never (bit-identical either way).
    self.fused_update = None
    self._langevin_math = _maybe_jit(self._langevin_step_math, jit_compile)
    self._outer_math = _maybe_jit(self._outer_step_math, jit_compile)

  # The hyperparameters, read-only (`algorithm.Hyperparameters`).
  gamma0 = property(lambda self: self.hyperparameters.gamma)
  scoping = property(lambda self: self.hyperparameters.scoping)
  noise = property(lambda self: self.hyperparameters.noise)
  alpha = property(lambda self: self.hyperparameters.alpha)
  weight_decay = property(lambda self: self.hyperparameters.weight_decay)
  conventions = property(lambda self: self.hyperparameters.conventions)

  @property
  def seed(self) -> int:
    return self.hyperparameters.seed

  @seed.setter
  def seed(self, seed: int):  # A new noise stream; the rest unchanged.
    self.hyperparameters = dataclasses.replace(self.hyperparameters,
                                               seed=seed)

  @property
  def num_langevin_steps(self) -> int:
    return self.hyperparameters.num_langevin_steps

  def _apply_counter(self):
    return self.inner_step  # `apply` is one SGLD step.

  def _create_state(self, parameters):
    c = self.conventions
    self.inner_step = _counter("inner_step")
    for i, p in enumerate(parameters):
      self.anchor.append(_state_like(p, f"anchor_{i}"))
      self.mean.append(_state_like(p, f"mean_{i}"))
      if c.inner_momentum > 0:
        self.inner_velocities.append(_state_like(p, f"inner_velocity_{i}"))
      if c.outer_momentum > 0:
        self.outer_velocities.append(_state_like(p, f"outer_velocity_{i}"))

  def gamma(self, step=None, dtype=tf.float32) -> tf.Tensor:
    """gamma_t for outer step `step` (default: the current one), in `dtype`."""
    step = tf.cast(self.step if step is None else step, tf.int64)
    return algorithm.gamma_at(self.hyperparameters, step,
                              tf.zeros([], dtype), TF_OPS)

  def begin_outer_step(self, parameters, anchor_gradients=None):
    """x', mu <- x; restarts the inner momentum.

    With `needs_anchor_gradient`, `anchor_gradients` (the gradient at x on a
    minibatch of its own) becomes the outer momentum buffer at t = 0 (see
    `Conventions.outer_velocity_init`).
    """
    self._check_parameters(parameters)
    if not self.needs_anchor_gradient:
      anchor_gradients = None
    elif anchor_gradients is None:
      raise ValueError(
          "These conventions (outer_velocity_init='anchor_gradient' with "
          "outer momentum) need the gradient at x: call "
          "begin_outer_step(parameters, anchor_gradients) with the gradient "
          "on a minibatch of its own (train_step.make_train_step does).")
    else:
      self._check_updates(anchor_gradients, parameters)

    def restart(*gradients):
      state = algorithm.begin_outer_step(
          self.hyperparameters, _read(parameters),
          _read(self.inner_velocities), _read(self.outer_velocities),
          gradients, tf.equal(self.step.read_value(), 0),
          zeros_like=tf.zeros_like, where=tf.where)
      targets = (self.anchor, self.mean, self.inner_velocities,
                 self.outer_velocities)
      for variables, values in zip(
          targets[:4 if self.needs_anchor_gradient else 3], state):
        _assign(variables, values)
      self.inner_step.assign(0)

    distribution.update_on_each_device(self.step, restart,
                                       *(anchor_gradients or ()))

  def _langevin_step_math(self, samples, anchors, means, gradients,
                          velocities, step, inner_step, noise_stream):
    return langevin_lib.langevin_update(
        self.hyperparameters, samples, anchors, means, gradients, velocities,
        step=step, inner_step=inner_step, stream=noise_stream,
        langevin_learning_rate=self.langevin_learning_rate,
        use_kernel=self.use_noise_kernel, fused=self.fused_update)

  def _apply_on_device(self, gradients, parameters, noise_stream=0):
    samples, means, velocities = self._langevin_math(
        _read(parameters), _read(self.anchor), _read(self.mean), gradients,
        _read(self.inner_velocities), self.step.read_value(),
        self.inner_step.read_value(), tf.cast(noise_stream, tf.int64))
    _assign(parameters, samples)
    _assign(self.mean, means)
    _assign(self.inner_velocities, velocities)
    self.inner_step.assign_add(1)

  def _outer_step_math(self, anchors, means, velocities, step):
    return algorithm.outer_update(
        self.hyperparameters, anchors, means, velocities, step=step,
        learning_rate=self.learning_rate, ops=TF_OPS)

  def end_outer_step(self, parameters):
    """x <- x - eta * s * (x - mu); returns gamma and ||x - mu||."""
    self._check_parameters(parameters)
    metrics = {
        "gamma": self.gamma(),
        "anchor_to_mean_distance": _distance(_read(self.anchor),
                                             _read(self.mean)),
    }

    def outer_update():
      anchors, velocities = self._outer_math(
          _read(self.anchor), _read(self.mean),
          _read(self.outer_velocities), self.step.read_value())
      _assign(parameters, anchors)
      _assign(self.outer_velocities, velocities)
      self.step.assign_add(1)

    distribution.update_on_each_device(self.step, outer_update)
    return metrics


def _replica_id():
  context = tf.distribute.get_replica_context()
  replica_id = 0 if context is None else context.replica_id_in_sync_group
  return tf.cast(replica_id, tf.int64)


class Parle(EntropySGD):
  """Parle-style replicated Entropy-SGD (Chaudhari et al., arXiv:1707.00424).

  Every replica runs its own Entropy-SGD chain on its own data: its own
  gradients (no all-reduce inside the inner loop) and its own Langevin
  noise (stream = replica id). Once per outer step the replicas are
  coupled elastically to their mean, with one all-reduce:

      x_a <- EntropySGD outer step of replica a           (local)
      xbar <- mean over replicas of x_a                   (one all-reduce)
      x_a <- x_a - c (x_a - xbar),  c = min(eta * rho_t, 1)
      rho_t = rho0 * (1 + rho1)**t;  rho = inf averages exactly (c = 1).

  So a step costs one all-reduce of the weights per L gradient evaluations
  instead of L all-reduces of the gradients. With one replica xbar = x and
  Parle is Entropy-SGD; so it is with identical data and noise on every
  replica, for any rho. Call `apply` and `end_outer_step` in replica
  context (`strategy.run`). Checkpoints hold replica 0's copy of the
  weights; a resumed run restarts every replica from it.
  """

  all_reduces_gradients = False
  diagnostics = dict(EntropySGD.diagnostics, rho="parle/rho",
                     distance_to_replica_mean="parle/distance_to_replica_mean")

  def __init__(self, *args, rho: float = 1.0, rho_scoping: float = 1e-3,
               **kwargs):
    """Constructs Parle; `rho`, `rho_scoping` give rho_t, other args as
    `EntropySGD`."""
    super().__init__(*args, **kwargs)
    _check_positive("rho", rho)
    _check_non_negative("rho_scoping", rho_scoping)
    self.rho0 = rho
    self.rho_scoping = rho_scoping

  def rho(self, step=None, dtype=tf.float32) -> tf.Tensor:
    """rho_t for outer step `step` (default: the current one), in `dtype`."""
    step = self.step if step is None else step
    if self.rho0 == float("inf"):
      return tf.constant(float("inf"), dtype)
    return algorithm.scoped_gamma(self.rho0, self.rho_scoping,
                                  tf.cast(step, dtype), tf.exp)

  def apply(self, updates, parameters):
    """One SGLD step of this replica's chain, on its own gradients."""
    self._check_parameters(parameters)
    self._check_updates(updates, parameters)
    distribution.update_on_each_device(
        self.step,
        lambda stream, *g: self._apply_on_device(list(g), parameters,
                                                 noise_stream=stream),
        _replica_id(), *updates)

  def end_outer_step(self, parameters):
    """Local outer step, then the elastic coupling to the replica mean."""
    self._check_parameters(parameters)
    step = self.step.read_value()
    anchors, velocities = self._outer_math(
        _read(self.anchor), _read(self.mean), _read(self.outer_velocities),
        step)
    context = tf.distribute.get_replica_context()
    if context is None:
      raise RuntimeError("Parle.end_outer_step must run in replica context "
                         "(inside strategy.run).")
    means = context.all_reduce(tf.distribute.ReduceOp.MEAN, anchors)

    def coupling(dtype):  # c = min(eta * rho_t, 1), in the parameters' dtype.
      return tf.minimum(
          _as_dtype(self.learning_rate, dtype) * self.rho(step, dtype), 1.0)

    coupled = [x - coupling(x.dtype) * (x - xbar)
               for x, xbar in zip(anchors, means)]
    metrics = {
        "gamma": self.gamma(step),
        "rho": self.rho(step),
        "anchor_to_mean_distance": _distance(_read(self.anchor),
                                             _read(self.mean)),
        "distance_to_replica_mean": _distance(anchors, means),
    }

    def assign(*values):
      new_anchors, new_velocities = values[:len(anchors)], values[len(anchors):]
      _assign(parameters, new_anchors)
      _assign(self.outer_velocities, new_velocities)
      self.step.assign_add(1)

    distribution.update_on_each_device(self.step, assign, *coupled,
                                       *velocities)
    return metrics


def _distance(xs, ys):
  return algorithm.distance(xs, ys, TF_OPS)
