"""Pure update rules of Entropy-SGD and its SGD baselines.

Every function here maps tensors to tensors and touches no variable, so the
same math serves the Sonnet optimizers (`optimizers.py`), the Keras plugin and
the NumPy-checked tests. Notation follows Algorithm 1 of Chaudhari et al.,
"Entropy-SGD: Biasing Gradient Descent Into Wide Valleys" (ICLR 2017):

    x   anchor (the weights being trained)      x'  Langevin sample
    mu  running mean of the samples              eta outer learning rate
    eta' Langevin (SGLD) step size               eps thermal noise
    gamma scope, grown as gamma0 * (1 + gamma1)**t
"""

import math

import tensorflow as tf


def momentum_direction(direction, velocity, momentum, nesterov):
  """Heavy-ball or Nesterov momentum, as in Sonnet and PyTorch (no dampening).

      v <- momentum * v + d
      d <- d + momentum * v   (Nesterov)   or   d <- v   (heavy ball)

  Returns `(direction, velocity)`. With `momentum == 0` the direction is
  returned unchanged.
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


def sgd_step(parameter, gradient, velocity, learning_rate, weight_decay,
             momentum=0.0, nesterov=False):
  """SGD with L2 weight decay inside the (optional) momentum buffer."""
  direction = gradient + weight_decay * parameter
  return descent_step(parameter, direction, velocity, learning_rate, momentum,
                      nesterov)


def adam_step(parameter, gradient, first_moment, second_moment, step, *,
              learning_rate, beta1, beta2, epsilon, weight_decay):
  """One Adam step as Torch's `optim.adam` takes it (Kingma & Ba, Alg. 1).

      g <- g + weight_decay * x           (coupled L2, as `optim.adam`)
      m <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2
      x <- x - lr sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + epsilon)

  `step` is t, counted from 1. Epsilon is added to sqrt(v) before the bias
  correction of v (Torch, and Kingma & Ba's "epsilon-hat" form), not to
  sqrt(v_hat) as in PyTorch's `torch.optim.Adam`. Returns `(parameter,
  first_moment, second_moment)`.
  """
  gradient = gradient + weight_decay * parameter
  first_moment = beta1 * first_moment + (1 - beta1) * gradient
  second_moment = beta2 * second_moment + (1 - beta2) * tf.square(gradient)
  step = tf.cast(step, parameter.dtype)
  step_size = (learning_rate * tf.sqrt(1 - tf.pow(beta2, step)) /
               (1 - tf.pow(beta1, step)))
  parameter = parameter - step_size * first_moment / (
      tf.sqrt(second_moment) + epsilon)
  return parameter, first_moment, second_moment


def sam_perturbations(parameters, gradients, *, rho, adaptive, eta):
  """The ascent step of SAM (Foret et al., ICLR 2021, Eq. 2) or ASAM.

      SAM:   eps = rho g / ||g||
      ASAM:  eps = rho T^2 g / ||T g||,  T = |w| + eta  (Kwon et al., ICML
             2021, Eq. 8 with the element-wise T_w of their Sec. 4)

  The norm is over all parameters together. A zero gradient gives eps = 0.
  Returns the list of eps, one per parameter.
  """
  if adaptive:
    scales = [tf.abs(w) + eta for w in parameters]
    directions = [t * g for t, g in zip(scales, gradients)]
  else:
    scales = [None] * len(parameters)
    directions = list(gradients)
  norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(d)) for d in directions]))
  factor = tf.math.divide_no_nan(tf.cast(rho, norm.dtype), norm)
  return [factor * (d if t is None else t * d)
          for t, d in zip(scales, directions)]


def scoped_gamma(gamma, scoping, step, dtype=tf.float32):
  """gamma_t = gamma0 * (1 + gamma1)**t, computed as exp(t * log1p(gamma1)).

  Computed in `dtype`, the parameters' dtype: float64 parameters get a
  float64 gamma (the Python floats `gamma` and `scoping` never pass through
  float32). `log1p` is taken in float64 on the host, so the result stays
  accurate in float32 (no float64 on TPU) for hundreds of thousands of steps.
  """
  log_growth = math.log1p(scoping)
  step = tf.cast(step, dtype)
  return gamma * tf.exp(step * log_growth)


def langevin_noise_std(langevin_learning_rate, noise, noise_scale):
  """Standard deviation of the noise added to x' in one SGLD step.

  noise_scale="sqrt_lr":  sqrt(eta') * eps        (paper, Algorithm 1)
  noise_scale="sqrt_2lr": sqrt(2 * eta') * eps    (Lua and PyTorch reference:
      eps / sqrt(eta'/2) is added to the gradient, then multiplied by eta')
  """
  if noise_scale == "sqrt_lr":
    return tf.sqrt(langevin_learning_rate) * noise
  if noise_scale == "sqrt_2lr":
    return tf.sqrt(2.0 * langevin_learning_rate) * noise
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
  Either way x' moves by +noise_std * N(0, I).
  Returns `(sample, velocity)`.
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
  if standard_normal is not None and not aliased:  # None: no noise (eps = 0).
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
