"""The `pytorch_reference` conventions against a NumPy transcription of the
reference's `python/optim.py` (ucla-vision/entropy-sgd), as `python/train.py`
drives it.

`ReferenceEntropySGD` below is written from the reference's logic, not from
this library: it keeps the reference's state layout and its in-place tensor
operations, and binds names to arrays exactly where the reference binds them
to tensors (`dw = w.grad.data`, `dw = mdw`), so the reference's aliasing
happens here too without being spelt out. Everything runs in float64 on a
tiny MLP with its own NumPy forward/backward pass; the library side runs
through `train_step.make_train_step` with a float64 Sonnet MLP. Only the
minibatches and the Langevin noise are shared: the reference's `eta` of
inner step (t, l) is the negative of our N(0, I) draw (the reference adds
c * eta to the direction, which moves x' by -eta' c eta; we add the noise to
x'), a relabelling of an equally distributed draw.
"""

import dataclasses
import functools

from absl.testing import parameterized
import numpy as np
import sonnet as snt
import tensorflow as tf

from entropy_sgd.core import distribution
from entropy_sgd.core import optimizers
from entropy_sgd.core import testing
from entropy_sgd.core import train_step as train_step_lib

FEATURES, HIDDEN, CLASSES, BATCH = 5, 4, 3, 6
make_data = functools.partial(testing.make_data, batch=BATCH,
                              features=FEATURES, classes=CLASSES,
                              dtype=np.float64)
batches_of = functools.partial(testing.batches_of, batch=BATCH)
NAMES = ("hidden/w", "hidden/b", "logits/w", "logits/b")


# ----------------------------------------------- The reference, in NumPy.


class Parameter:
  """A torch parameter as optim.py uses it: `.data` and `.grad`, in place."""

  def __init__(self, data):
    self.data = np.array(data, np.float64)
    self.grad = np.zeros_like(self.data)


class ReferenceEntropySGD:
  """`EntropySGD.step` of python/optim.py, transcribed to NumPy.

  `config` takes the reference's keys (lr, momentum, damp, weight_decay,
  nesterov, L, eps, g0, g1); its Langevin step size 0.1 and beta1 = 0.75
  are fixed, as in the reference. `closure()` zeroes the gradients, takes
  the next minibatch and writes its gradient into every `.grad` in place.
  `eta(l)` gives the standard normal draws of inner step l, one array per
  parameter.
  """

  def __init__(self, params, config):
    self.params = params
    self.config = config
    self.state = {}

  def step(self, closure, eta):
    closure()  # The reference's extra evaluation at x (its reported loss).
    c = self.config
    lr, mom, wd, damp = c["lr"], c["momentum"], c["weight_decay"], c["damp"]
    nesterov, num_inner, eps = c["nesterov"], int(c["L"]), c["eps"]
    g0, g1 = c["g0"], c["g1"]
    state = self.state
    if "t" not in state:  # First call: copies of x and of the gradient at x.
      state["t"] = 0
      state["wc"] = [p.data.copy() for p in self.params]
      state["mdw"] = [p.grad.copy() for p in self.params]
      state["langevin"] = dict(mw=[a.copy() for a in state["wc"]],
                               mdw=[a.copy() for a in state["mdw"]],
                               lr=0.1, beta1=0.75)
    langevin = state["langevin"]
    for i, p in enumerate(self.params):
      state["wc"][i][...] = p.data
      langevin["mw"][i][...] = p.data
      langevin["mdw"][i][...] = 0.0
    llr, beta1 = langevin["lr"], langevin["beta1"]
    g = g0 * (1 + g1)**state["t"]  # `t` is never incremented.

    for l in range(num_inner):
      closure()
      draws = eta(l)
      for i, p in enumerate(self.params):
        wc, mw, mdw = state["wc"][i], langevin["mw"][i], langevin["mdw"][i]
        dw = p.grad  # The gradient tensor itself.
        if wd > 0:
          dw += wd * p.data
        if mom > 0:
          mdw *= mom
          mdw += (1 - damp) * dw
          if nesterov:
            dw += mom * mdw
          else:
            dw = mdw  # From here on, dw IS the momentum buffer.
        dw += -g * (wc - p.data)
        dw += eps / np.sqrt(0.5 * llr) * draws[i]
        p.data += -llr * dw
        mw *= beta1
        mw += (1 - beta1) * p.data

    if num_inner > 0:
      for i, p in enumerate(self.params):
        p.data[...] = state["wc"][i]
        p.grad[...] = p.data - langevin["mw"][i]

    for i, p in enumerate(self.params):
      mdw = state["mdw"][i]
      dw = p.grad
      if wd > 0:
        dw += wd * p.data
      if mom > 0:
        mdw *= mom
        mdw += (1 - damp) * dw
        if nesterov:
          dw += mom * mdw
        else:
          dw = mdw
      p.data += -lr * dw


def mlp_gradients(w, x, y):
  """Gradients of the mean softmax cross-entropy of x -> tanh(x W1 + b1) W2
  + b2, by hand."""
  hidden = np.tanh(x @ w["hidden/w"] + w["hidden/b"])
  logits = hidden @ w["logits/w"] + w["logits/b"]
  logits -= logits.max(axis=1, keepdims=True)
  probabilities = np.exp(logits)
  probabilities /= probabilities.sum(axis=1, keepdims=True)
  d_logits = probabilities
  d_logits[np.arange(len(y)), y] -= 1.0
  d_logits /= len(y)
  d_pre = (d_logits @ w["logits/w"].T) * (1.0 - hidden**2)
  return {"hidden/w": x.T @ d_pre, "hidden/b": d_pre.sum(axis=0),
          "logits/w": hidden.T @ d_logits, "logits/b": d_logits.sum(axis=0)}


def run_reference(initial, batches, config, num_steps, eta_of=None):
  """`num_steps` reference steps; `eta_of(t, l)` -> draws (default: none)."""
  params = [Parameter(initial[name]) for name in NAMES]
  batch_iterator = iter(batches)

  def closure():
    x, y = next(batch_iterator)
    w = {name: p.data for name, p in zip(NAMES, params)}
    gradients = mlp_gradients(w, x, y)
    for name, p in zip(NAMES, params):
      p.grad[...] = 0.0
      p.grad += gradients[name]

  optimizer = ReferenceEntropySGD(params, config)
  for t in range(num_steps):
    if eta_of is None:
      eta = lambda l: [np.zeros_like(p.data) for p in params]
    else:
      eta = lambda l, t=t: eta_of(t, l)
    optimizer.step(closure, eta)
  return {name: p.data for name, p in zip(NAMES, params)}


# ------------------------------------------------------- The library side.


class MLP(snt.Module):
  """The same MLP in float64."""

  def __init__(self):
    super().__init__(name="mlp")
    self.hidden = snt.Linear(HIDDEN, name="hidden")
    self.logits = snt.Linear(CLASSES, name="logits")

  def __call__(self, x, is_training, use_dropout=None):  # No dropout.
    del is_training
    return self.logits(tf.tanh(self.hidden(tf.cast(x, tf.float64))))


def short_name(variable):
  return "/".join(variable.name.split(":")[0].split("/")[-2:])


HYPER = dict(lr=0.5, L=3, weight_decay=0.01, g0=0.3, g1=0.2, momentum=0.9)


def conventions_for(nesterov, **changes):
  return dataclasses.replace(optimizers.PYTORCH_REFERENCE,
                             inner_nesterov=nesterov, outer_nesterov=nesterov,
                             **changes)


def run_library(conventions, x, y, num_steps, eps, seed=5, strategy=None):
  """Our EntropySGD through make_train_step, float64; returns (initial
  weights, final weights, metrics, noise lookup)."""
  strategy = strategy or tf.distribute.get_strategy()
  model = train_step_lib.build_model(strategy, MLP, [FEATURES])
  rng = np.random.RandomState(42)
  for v in model.trainable_variables:
    v.assign(rng.normal(scale=0.5, size=v.shape))
  initial = {short_name(v): v.numpy() for v in model.trainable_variables}
  optimizer = optimizers.EntropySGD(
      learning_rate=HYPER["lr"], num_langevin_steps=HYPER["L"],
      langevin_learning_rate=0.1, gamma=HYPER["g0"], scoping=HYPER["g1"],
      noise=eps, alpha=0.75, weight_decay=HYPER["weight_decay"],
      conventions=conventions, seed=seed)
  dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
  step = train_step_lib.make_train_step(model, optimizer, strategy, BATCH)
  iterator = iter(strategy.experimental_distribute_dataset(dataset))
  metrics = [step(iterator) for _ in range(num_steps)]
  final = {short_name(v): v.numpy() for v in model.trainable_variables}

  names = [short_name(v) for v in model.trainable_variables]
  shapes = [v.shape for v in model.trainable_variables]

  def eta_of(t, l):  # The reference's eta: minus our draw.
    draws = optimizers.langevin_noise(seed, tf.constant(t, tf.int64),
                                      tf.constant(l, tf.int64), shapes,
                                      tf.float64)
    by_name = dict(zip(names, draws))
    return [-by_name[name].numpy() for name in NAMES]

  return initial, final, metrics, eta_of


def reference_config(nesterov, eps, momentum=HYPER["momentum"]):
  return dict(lr=HYPER["lr"], momentum=momentum, damp=0.0,
              weight_decay=HYPER["weight_decay"], nesterov=nesterov,
              L=HYPER["L"], eps=eps, g0=HYPER["g0"], g1=HYPER["g1"])


def max_relative_difference(actual, expected):
  return max(np.abs(actual[k] - expected[k]).max() /
             max(np.abs(expected[k]).max(), 1e-3) for k in NAMES)


class PytorchReferenceTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(nesterov=[True, False], eps=[0.0, 0.05])
  def test_reproduces_the_reference(self, nesterov, eps):
    num_steps = 3
    x, y = make_data(num_steps * (HYPER["L"] + 1))
    initial, final, metrics, eta_of = run_library(
        conventions_for(nesterov), x, y, num_steps, eps)
    expected = run_reference(initial, batches_of(x, y),
                             reference_config(nesterov, eps), num_steps,
                             eta_of if eps else None)
    self.assertLess(max_relative_difference(final, expected), 1e-12)
    # Its scoping never advances.
    self.assertAllClose([m["gamma"] for m in metrics],
                        [HYPER["g0"]] * num_steps)

  @parameterized.named_parameters(
      ("velocity_from_zero_nesterov", True,
       dict(outer_velocity_init="zero")),
      ("velocity_from_zero_heavy_ball", False,
       dict(outer_velocity_init="zero")),
      ("gradient_only_buffer_heavy_ball", False,
       dict(inner_momentum_buffer="gradient")),
      ("scoping_advances", True, dict(scoping_advances=True)),
  )
  def test_each_convention_is_needed(self, nesterov, changes):
    # Without any one of them the trajectories part far beyond round-off.
    num_steps = 2
    x, y = make_data(num_steps * (HYPER["L"] + 1))
    initial, final, _, _ = run_library(conventions_for(nesterov, **changes),
                                       x, y, num_steps, 0.0)
    if changes.get("outer_velocity_init") == "zero":
      # No anchor gradient: this run took only L batches per step. Feed the
      # reference the same inner batches, with its extra evaluation on a
      # batch of its own.
      batches = batches_of(x, y)[:num_steps * HYPER["L"]]
      extra = batches_of(*make_data(1, seed=9))[0]
      batches = [b for s in range(num_steps) for b in
                 [extra] + batches[s * HYPER["L"]:(s + 1) * HYPER["L"]]]
    else:
      batches = batches_of(x, y)
    expected = run_reference(initial, batches,
                             reference_config(nesterov, 0.0), num_steps)
    self.assertGreater(max_relative_difference(final, expected), 1e-6)

  def test_buffer_convention_changes_nothing_with_nesterov(self):
    x, y = make_data(2 * (HYPER["L"] + 1))
    _, direction, _, _ = run_library(conventions_for(True), x, y, 2, 0.05)
    _, gradient, _, _ = run_library(
        conventions_for(True, inner_momentum_buffer="gradient"), x, y, 2,
        0.05)
    self.assertLess(max_relative_difference(gradient, direction), 1e-13)

  def test_momentum_zero_wastes_the_extra_gradient(self):
    # Without momentum the reference's extra gradient only feeds its loss
    # report: our step skips it and matches the reference on the same inner
    # batches whatever batch the reference evaluated in between.
    num_steps = 2
    zero = conventions_for(False, inner_momentum=0.0, outer_momentum=0.0)
    x, y = make_data(num_steps * HYPER["L"])
    initial, final, _, eta_of = run_library(zero, x, y, num_steps, 0.05)
    inner = batches_of(x, y)
    extra = batches_of(*make_data(num_steps, seed=3))
    batches = [b for s in range(num_steps) for b in
               [extra[s]] + inner[s * HYPER["L"]:(s + 1) * HYPER["L"]]]
    expected = run_reference(initial, batches,
                             reference_config(False, 0.05, momentum=0.0),
                             num_steps, eta_of)
    self.assertLess(max_relative_difference(final, expected), 1e-12)

  def test_counts_the_extra_gradient(self):
    optimizer = optimizers.EntropySGD(num_langevin_steps=4,
                                      conventions="pytorch_reference")
    self.assertTrue(optimizer.needs_anchor_gradient)
    self.assertEqual(optimizer.gradient_evaluations_per_step, 5)
    self.assertEqual(optimizer.apply_calls_per_step, 4)
    for name in ("paper", "lua_reference"):
      optimizer = optimizers.EntropySGD(num_langevin_steps=4,
                                        conventions=name)
      self.assertFalse(optimizer.needs_anchor_gradient)
      self.assertEqual(optimizer.gradient_evaluations_per_step, 4)

  def test_two_replicas_follow_the_reference(self):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    self.assertLen(devices, 2, "setUpModule sets up 2 logical CPUs")
    num_steps = 2
    x, y = make_data(num_steps * (HYPER["L"] + 1))
    initial, final, _, eta_of = run_library(
        conventions_for(True), x, y, num_steps, 0.05,
        strategy=tf.distribute.MirroredStrategy(devices))
    expected = run_reference(initial, batches_of(x, y),
                             reference_config(True, 0.05), num_steps, eta_of)
    self.assertLess(max_relative_difference(final, expected), 1e-12)

  def test_consumes_l_plus_one_batches_per_step(self):
    x, y = make_data(2 * (HYPER["L"] + 1))  # Exactly two steps' worth.
    strategy = tf.distribute.get_strategy()
    model = train_step_lib.build_model(strategy, MLP, [FEATURES])
    optimizer = optimizers.EntropySGD(num_langevin_steps=HYPER["L"],
                                      conventions="pytorch_reference")
    step = train_step_lib.make_train_step(model, optimizer, strategy, BATCH)
    iterator = iter(tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH))
    step(iterator, num_steps=2)
    with self.assertRaises((tf.errors.OutOfRangeError, StopIteration)):
      next(iterator)


def setUpModule():
  distribution.logical_cpus(2)  # Before TensorFlow starts up.


if __name__ == "__main__":
  tf.test.main()
