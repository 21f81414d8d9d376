"""Algorithm 1 of Entropy-SGD, framework-neutral.

Chaudhari et al., "Entropy-SGD: Biasing Gradient Descent Into Wide Valleys"
(ICLR 2017). One outer step t on weights x, with gamma_t = gamma0 (1 +
gamma1)^t:

    x', mu <- x
    for l = 0..L-1, each on a fresh minibatch:
      dx' <- grad f(x') + wd x' - gamma_t (x - x')
      x'  <- x' - eta' dx' + sqrt(eta') eps N(0, I)
      mu  <- (1 - alpha) mu + alpha x'
    x <- x - eta gamma_t (x - mu)

This file holds the conventions in which the paper and the reference codes
differ, their presets, the hyperparameters and the pure update functions,
element-wise and over lists of parameters. It imports no framework: tensors
are combined with `+ - *` only, and the few functions that need more take an
`Ops` (sqrt, exp, sum, cast). The Sonnet optimizers (`optimizers.py`), the
Keras optimizer (`keras_plugin.py`) and any other front end hold the
variables and call these functions, so they follow one trajectory.

Notation: x anchor (the weights), x' Langevin sample, mu running mean of the
samples, eta outer learning rate, eta' Langevin step size, eps thermal noise,
gamma scope.
"""

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple


class Ops(NamedTuple):
  """The framework's operations the math needs beyond `+ - *`.

  sqrt, exp: element-wise. sum: the sum of all elements of a tensor.
  cast(value, like): `value` (a Python number, or a tensor) in the dtype of
  tensor `like`; a Python float must become that dtype directly (not via
  float32).
  """
  sqrt: Callable[[Any], Any]
  exp: Callable[[Any], Any]
  sum: Callable[[Any], Any]
  cast: Callable[[Any, Any], Any]


def check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}; got {value!r}")


def check_range(name, value, low, high):
  if not low <= value < high:
    raise ValueError(f"{name} must be in [{low}, {high}); got {value}")


def check_positive(name, value):
  if isinstance(value, (int, float)) and not value > 0:
    raise ValueError(f"{name} must be > 0; got {value}")


def check_non_negative(name, value):
  if isinstance(value, (int, float)) and not value >= 0:
    raise ValueError(f"{name} must be >= 0; got {value}")


def check_num_langevin_steps(value):
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(
        f"num_langevin_steps (L) must be an integer >= 1; got {value!r}")


# ------------------------------------------------------------ Conventions.


@dataclasses.dataclass(frozen=True)
class Conventions:
  """Where the paper and the reference implementations of Entropy-SGD differ.

  Attributes:
    alpha_weights: what `alpha` multiplies in the running mean.
      "new_sample" (paper, Alg. 1): mu <- (1 - alpha) * mu + alpha * x'.
      "old_mean" (Lua/PyTorch `beta1`): mu <- alpha * mu + (1 - alpha) * x'.
    noise_scale: standard deviation of the SGLD noise per step.
      "sqrt_lr" (paper): sqrt(eta') * eps.
      "sqrt_2lr" (reference code): sqrt(2 * eta') * eps.
    outer_scale: scale s of the outer step x <- x - eta * s * (x - mu).
      "gamma" (paper ICLR version, Alg. 1) or "one" (reference code).
    inner_momentum: momentum of the SGLD steps (0 in the paper, 0.9 in the
      reference codes); its buffer restarts at every outer step.
    inner_nesterov: Nesterov form of the inner momentum.
    inner_weight_decay: where weight decay enters the SGLD step:
      "before_momentum" (PyTorch reference) or "after_momentum" (Lua).
    inner_momentum_buffer: what the heavy-ball buffer v of the SGLD steps
      accumulates. "gradient" (default): v <- m v + g (+ wd x' when weight
      decay comes before the momentum); the coupling -gamma (x - x'), weight
      decay after the momentum and the noise enter only this step's
      direction. "direction" (Lua and PyTorch reference): their `dw = mdw`
      makes the direction the buffer itself, so those terms are added to v
      as well and carried into the later SGLD steps of the outer step with
      weights m, m^2, ... With Nesterov momentum (both presets) the
      direction is a separate tensor and this field changes nothing; it
      matters for heavy-ball (`inner_nesterov=False`).
    outer_momentum: momentum of the outer step (0 in paper and Lua, 0.9 in
      the PyTorch reference).
    outer_nesterov: Nesterov form of the outer momentum.
    outer_weight_decay: whether weight decay is added to the outer
      direction too (PyTorch reference) or only in the inner loop.
    outer_velocity_init: the outer momentum buffer before the first outer
      step. "zero" (default) or "anchor_gradient" (PyTorch reference): the
      gradient at x on the minibatch of the reference's extra evaluation
      (its `deepcopy(w.grad)` on first use; no weight decay). With outer
      momentum m > 0 the outer step t then carries an extra m^(t+1) grad
      f(x_0) (heavy ball; m^(t+2) with Nesterov), so the optimizer needs
      that gradient (`needs_anchor_gradient`): it is evaluated at x on a
      minibatch of its own before the inner loop of every outer step, as
      the reference does (so both consume L + 1 minibatches per step).
    scoping_offset: gamma_t = gamma0 * (1 + gamma1)**(t + offset) for the
      t-th outer step (t from 0). Lua increments its counter first: 1.
    scoping_advances: False keeps gamma at gamma0 * (1 + gamma1)**offset
      forever: the PyTorch reference computes gamma0 (1 + gamma1)**t from a
      counter `t` it never increments (its bug, reproduced only by the
      `pytorch_reference` preset).
  """
  alpha_weights: str = "new_sample"
  noise_scale: str = "sqrt_lr"
  outer_scale: str = "gamma"
  inner_momentum: float = 0.0
  inner_nesterov: bool = False
  inner_weight_decay: str = "before_momentum"
  inner_momentum_buffer: str = "gradient"
  outer_momentum: float = 0.0
  outer_nesterov: bool = False
  outer_weight_decay: bool = False
  outer_velocity_init: str = "zero"
  scoping_offset: int = 0
  scoping_advances: bool = True

  @property
  def needs_anchor_gradient(self) -> bool:
    """Whether the outer step needs the gradient at x on a batch of its own
    (the outer momentum starts from it): one more gradient per step."""
    return (self.outer_velocity_init == "anchor_gradient" and
            self.outer_momentum > 0)

  def __post_init__(self):
    check_choice("alpha_weights", self.alpha_weights,
                 ("new_sample", "old_mean"))
    check_choice("noise_scale", self.noise_scale, ("sqrt_lr", "sqrt_2lr"))
    check_choice("outer_scale", self.outer_scale, ("gamma", "one"))
    check_choice("inner_weight_decay", self.inner_weight_decay,
                 ("before_momentum", "after_momentum"))
    check_choice("inner_momentum_buffer", self.inner_momentum_buffer,
                 ("gradient", "direction"))
    check_choice("outer_velocity_init", self.outer_velocity_init,
                 ("zero", "anchor_gradient"))
    if not isinstance(self.scoping_advances, bool):
      raise ValueError(f"scoping_advances must be True or False; got "
                       f"{self.scoping_advances!r}")
    check_range("inner_momentum", self.inner_momentum, 0.0, 1.0)
    check_range("outer_momentum", self.outer_momentum, 0.0, 1.0)
    if self.scoping_offset < 0:
      raise ValueError(
          f"scoping_offset must be >= 0; got {self.scoping_offset}")


# Algorithm 1 of the paper, with no momentum.
PAPER = Conventions()

# ucla-vision/entropy-sgd `entropyoptim.lua` with `train.lua`'s settings
# (momentum 0.9, Nesterov, dampening 0): the code behind the paper's numbers.
LUA_REFERENCE = Conventions(
    alpha_weights="old_mean",
    noise_scale="sqrt_2lr",
    outer_scale="one",
    inner_momentum=0.9,
    inner_nesterov=True,
    inner_weight_decay="after_momentum",
    inner_momentum_buffer="direction",  # No effect with Nesterov.
    outer_momentum=0.0,
    outer_weight_decay=False,
    scoping_offset=1,
)

# ucla-vision/entropy-sgd `python/optim.py` as `python/train.py` runs it
# (momentum 0.9, Nesterov, dampening 0; its Langevin step size 0.1 and
# beta1 = 0.75 are fixed: pass langevin_learning_rate=0.1, alpha=0.75).
# Where it differs from the Lua code:
PYTORCH_REFERENCE = dataclasses.replace(
    LUA_REFERENCE,
    inner_weight_decay="before_momentum",
    outer_momentum=0.9,
    outer_nesterov=True,
    outer_weight_decay=True,
    outer_velocity_init="anchor_gradient",
    scoping_offset=0,
    scoping_advances=False,
)

PRESETS: Mapping[str, Conventions] = {
    "paper": PAPER,
    "lua_reference": LUA_REFERENCE,
    "pytorch_reference": PYTORCH_REFERENCE,
}


def resolve_conventions(conventions) -> Conventions:
  """A `Conventions` from itself, a preset's name or a dict of its fields."""
  if isinstance(conventions, Conventions):
    return conventions
  if isinstance(conventions, str):
    if conventions not in PRESETS:
      raise ValueError(f"Unknown conventions preset {conventions!r}; "
                       f"choose one of {sorted(PRESETS)}.")
    return PRESETS[conventions]
  if isinstance(conventions, Mapping):
    return Conventions(**conventions)
  raise TypeError(f"conventions must be a preset name, a Conventions or a "
                  f"dict; got {type(conventions).__name__}.")


# -------------------------------------------------------- Hyperparameters.


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
  """The constants of Entropy-SGD; the learning rates eta and eta' are passed
  to each update, since schedules change them.

  Attributes:
    num_langevin_steps: L, SGLD steps (gradient evaluations) per update.
    gamma: gamma0, the initial scope (coupling of x' to x).
    scoping: gamma1; gamma grows by a factor (1 + gamma1) per outer step.
    noise: eps, the thermal noise of the SGLD steps.
    alpha: weight of the running mean; see `Conventions.alpha_weights`.
    weight_decay: L2 weight decay, see `Conventions.inner_weight_decay`.
    conventions: see `Conventions`.
    seed: seed of the Langevin noise.
  """
  num_langevin_steps: int = 20
  gamma: float = 0.03
  scoping: float = 1e-3
  noise: Any = 1e-4
  alpha: float = 0.75
  weight_decay: float = 0.0
  conventions: Conventions = PAPER
  seed: int = 0

  def __post_init__(self):
    check_num_langevin_steps(self.num_langevin_steps)
    check_positive("gamma", self.gamma)
    check_non_negative("scoping", self.scoping)
    check_non_negative("noise", self.noise)
    check_non_negative("weight_decay", self.weight_decay)
    if not 0.0 < self.alpha <= 1.0:
      raise ValueError(f"alpha must be in (0, 1]; got {self.alpha}")
    if not isinstance(self.conventions, Conventions):
      raise TypeError("conventions must be a Conventions; use "
                      "resolve_conventions for names and dicts.")

  @property
  def needs_anchor_gradient(self) -> bool:
    return self.conventions.needs_anchor_gradient

  @property
  def gradient_evaluations_per_step(self) -> int:
    """Minibatches one outer step consumes: L, plus the gradient at x when
    `needs_anchor_gradient`."""
    return self.num_langevin_steps + int(self.needs_anchor_gradient)

  @property
  def draws_noise(self) -> bool:
    """False when the noise is the number 0: then nothing is drawn."""
    return not (isinstance(self.noise, (int, float)) and self.noise == 0)

  @property
  def new_sample_weight(self) -> float:
    """w of mu <- (1 - w) mu + w x'."""
    if self.conventions.alpha_weights == "new_sample":
      return self.alpha
    return 1.0 - self.alpha

  def scoping_exponent(self, step):
    """t + offset for outer step `step` (t), or offset if gamma is frozen."""
    offset = self.conventions.scoping_offset
    return step + offset if self.conventions.scoping_advances else offset


# ------------------------------------------------- Element-wise functions.


def momentum_direction(direction, velocity, momentum, nesterov):
  """Heavy-ball or Nesterov momentum, as in Sonnet and PyTorch (no dampening).

      v <- momentum * v + d
      d <- d + momentum * v   (Nesterov)   or   d <- v   (heavy ball)

  Returns `(direction, velocity)`.
  """
  velocity = momentum * velocity + direction
  if nesterov:
    return direction + momentum * velocity, velocity
  return velocity, velocity


def descent_step(parameter, direction, velocity, learning_rate, momentum,
                 nesterov):
  """One (momentum) descent step `x <- x - lr * d`.

  `velocity` is None when no momentum is used. Returns `(parameter, velocity)`.
  """
  if velocity is not None:
    direction, velocity = momentum_direction(direction, velocity, momentum,
                                             nesterov)
  return parameter - learning_rate * direction, velocity


def scoped_gamma(gamma, scoping, exponent, exp):
  """gamma * (1 + scoping)**exponent, computed as exp(exponent * log1p(.)).

  `exponent` is a tensor of the result's dtype. `log1p` is taken in float64
  on the host, so the result stays accurate in float32 for hundreds of
  thousands of steps.
  """
  return gamma * exp(exponent * math.log1p(scoping))


def langevin_noise_std(langevin_learning_rate, noise, noise_scale, sqrt):
  """Standard deviation of the noise added to x' in one SGLD step.

  noise_scale="sqrt_lr":  sqrt(eta') * eps        (paper, Algorithm 1)
  noise_scale="sqrt_2lr": sqrt(2 * eta') * eps    (Lua and PyTorch reference:
      eps / sqrt(eta'/2) is added to the gradient, then multiplied by eta')
  """
  if noise_scale == "sqrt_lr":
    return sqrt(langevin_learning_rate) * noise
  if noise_scale == "sqrt_2lr":
    return sqrt(2.0 * langevin_learning_rate) * noise
  raise ValueError(f"noise_scale must be 'sqrt_lr' or 'sqrt_2lr'; got "
                   f"{noise_scale!r}")


def langevin_step(sample, anchor, gradient, velocity, standard_normal, *,
                  gamma, learning_rate, noise_std, weight_decay, momentum,
                  nesterov, decay_before_momentum,
                  buffer_takes_direction=False):
  """One SGLD step of the inner loop (Algorithm 1, lines 5-6).

      dx' = grad f(x') [+ wd * x'] -> momentum [+ wd * x'] - gamma * (x - x')
      x'  <- x' - eta' * dx' + noise_std * N(0, I)

  Weight decay enters before the momentum buffer when
  `decay_before_momentum` (PyTorch reference) and after it otherwise (Lua
  reference). By default the coupling to the anchor and the noise never enter
  the momentum buffer. With `buffer_takes_direction` and heavy-ball momentum
  (the reference codes' `dw = mdw`, which makes the direction the buffer
  itself) every term added after the momentum (weight decay after it, the
  coupling -gamma (x - x') and the noise, as -noise_std / eta' * N(0, I)) is
  added to the buffer too; with Nesterov momentum it changes nothing.
  Either way x' moves by +noise_std * N(0, I). `standard_normal` None: no
  noise. Returns `(sample, velocity)`.
  """
  direction = gradient
  if decay_before_momentum:
    direction = direction + weight_decay * sample
  aliased = buffer_takes_direction and velocity is not None and not nesterov
  if velocity is not None:
    direction, velocity = momentum_direction(direction, velocity, momentum,
                                             nesterov)
  if not decay_before_momentum:
    direction = direction + weight_decay * sample
  direction = direction - gamma * (anchor - sample)
  if aliased:
    if standard_normal is not None:
      direction = direction - (noise_std / learning_rate) * standard_normal
    velocity = direction
  sample = sample - learning_rate * direction
  if standard_normal is not None and not aliased:
    sample = sample + noise_std * standard_normal
  return sample, velocity


def running_mean_step(mean, sample, new_sample_weight):
  """mu <- (1 - w) * mu + w * x' (Algorithm 1, line 7, with w = alpha)."""
  return mean + new_sample_weight * (sample - mean)


def outer_step(anchor, mean, velocity, *, learning_rate, scale, weight_decay,
               momentum, nesterov):
  """The outer update x <- x - eta * (scale * (x - mu) [+ wd * x]).

  `scale * (x - mu)` is the local-entropy gradient estimate; the paper uses
  scale = gamma, the reference code scale = 1. Returns `(anchor, velocity)`.
  """
  direction = scale * (anchor - mean) + weight_decay * anchor
  return descent_step(anchor, direction, velocity, learning_rate, momentum,
                      nesterov)


# ---------------------------------------------- Over lists of parameters.


def gamma_at(hp: Hyperparameters, step, like, ops: Ops):
  """gamma_t for outer step `step`, in the dtype of tensor `like`."""
  return scoped_gamma(hp.gamma, hp.scoping,
                      ops.cast(hp.scoping_exponent(step), like), ops.exp)


def langevin_update(hp: Hyperparameters, samples, anchors, means, gradients,
                    velocities, standard_normals, *, step,
                    langevin_learning_rate, ops: Ops):
  """One SGLD step and one running-mean step for every parameter.

  `velocities` is [] without inner momentum; `standard_normals` holds one
  N(0, I) tensor per parameter, or is None when `not hp.draws_noise`.
  `step` is the outer step t (for gamma_t). Returns `(samples, means,
  velocities)`.
  """
  c = hp.conventions
  new_samples, new_means, new_velocities = [], [], []
  for i, (x_prime, x, mu, g) in enumerate(
      zip(samples, anchors, means, gradients)):
    learning_rate = ops.cast(langevin_learning_rate, x_prime)
    noise_std = langevin_noise_std(learning_rate, ops.cast(hp.noise, x_prime),
                                   c.noise_scale, ops.sqrt)
    standard_normal = None
    if standard_normals is not None:
      standard_normal = ops.cast(standard_normals[i], x_prime)
    x_prime, v = langevin_step(
        x_prime, x, g, velocities[i] if velocities else None,
        standard_normal,
        gamma=gamma_at(hp, step, x_prime, ops),
        learning_rate=learning_rate,
        noise_std=noise_std,
        weight_decay=hp.weight_decay,
        momentum=c.inner_momentum,
        nesterov=c.inner_nesterov,
        decay_before_momentum=c.inner_weight_decay == "before_momentum",
        buffer_takes_direction=c.inner_momentum_buffer == "direction")
    new_samples.append(x_prime)
    new_means.append(running_mean_step(mu, x_prime, hp.new_sample_weight))
    new_velocities.append(v)
  return new_samples, new_means, new_velocities if velocities else []


def outer_update(hp: Hyperparameters, anchors, means, velocities, *, step,
                 learning_rate, ops: Ops):
  """The outer step of every parameter; `velocities` is [] without outer
  momentum. Returns `(anchors, velocities)`."""
  c = hp.conventions
  new_anchors, new_velocities = [], []
  for i, (x, mu) in enumerate(zip(anchors, means)):
    scale = (gamma_at(hp, step, x, ops) if c.outer_scale == "gamma"
             else ops.cast(1, x))
    x, v = outer_step(
        x, mu, velocities[i] if velocities else None,
        learning_rate=ops.cast(learning_rate, x),
        scale=scale,
        weight_decay=hp.weight_decay if c.outer_weight_decay else 0.0,
        momentum=c.outer_momentum,
        nesterov=c.outer_nesterov)
    new_anchors.append(x)
    new_velocities.append(v)
  return new_anchors, new_velocities if velocities else []


def begin_outer_step(hp: Hyperparameters, parameters, inner_velocities,
                     outer_velocities, anchor_gradients, is_first_step, *,
                     zeros_like, where):
  """The state at the start of outer step t: x' and mu <- x, the inner
  momentum restarts at 0, and the outer momentum is `initial_outer_velocities`
  (`anchor_gradients` is ignored unless `hp.needs_anchor_gradient`).
  Returns (anchors, means, inner_velocities, outer_velocities)."""
  return (list(parameters), list(parameters),
          [zeros_like(v) for v in inner_velocities],
          initial_outer_velocities(hp, outer_velocities, anchor_gradients,
                                   is_first_step, where))


def initial_outer_velocities(hp: Hyperparameters, velocities,
                             anchor_gradients, is_first_step, where):
  """The outer momentum buffers at the start of outer step t: at t = 0 the
  gradient at x when `needs_anchor_gradient`, else unchanged.
  `where(condition, a, b)` selects element-wise."""
  if not hp.needs_anchor_gradient:
    return list(velocities)
  return [where(is_first_step, g, v)
          for v, g in zip(velocities, anchor_gradients)]


def distance(xs, ys, ops: Ops):
  """||xs - ys|| over all parameters together."""
  total = None
  for x, y in zip(xs, ys):
    term = ops.sum((x - y) * (x - y))
    total = term if total is None else total + term
  return ops.sqrt(total)


__all__ = [
    "Conventions", "Hyperparameters", "LUA_REFERENCE", "Ops", "PAPER",
    "PRESETS", "PYTORCH_REFERENCE", "distance", "gamma_at",
    "initial_outer_velocities", "langevin_noise_std", "langevin_step",
    "langevin_update", "outer_step", "outer_update", "resolve_conventions",
    "running_mean_step", "scoped_gamma",
]
