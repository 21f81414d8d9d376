"""Pure update rules of the baselines: SGD, Adam and SAM's ascent step.

Every function here maps tensors to tensors and touches no variable; the
Sonnet optimizers (`optimizers.py`) hold the state. Entropy-SGD's rules are
in `algorithm.py`, whose momentum step these share.
"""

import tensorflow as tf

from entropy_sgd.core.algorithm import descent_step


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
