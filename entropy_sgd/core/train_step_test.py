"""The compiled training step against an independent NumPy Algorithm 1.

The reference below shares no code with the library: it has its own MLP
forward/backward pass and its own transcription of Algorithm 1 and of the
reference-code variants, in float64. Only the noise draws (the stateless
`langevin_noise`) and the minibatches are fed to both sides.
"""

import dataclasses
import functools

from absl.testing import parameterized
import numpy as np
import sonnet as snt
import tensorflow as tf

from entropy_sgd.core import distribution
from entropy_sgd.core import optimizers
from entropy_sgd.core import precision
from entropy_sgd.core import testing
from entropy_sgd.core import train_step as train_step_lib

NUM_FEATURES, NUM_HIDDEN, NUM_CLASSES = 6, 5, 3
BATCH = 8
make_data = functools.partial(testing.make_data, batch=BATCH,
                              features=NUM_FEATURES, classes=NUM_CLASSES)
batches_of = functools.partial(testing.batches_of, batch=BATCH,
                               dtype=np.float64)
assert_close_relative = testing.assert_close_relative
mirrored_strategy = testing.mirrored_strategy


class MLP(snt.Module):
  """x -> tanh(x W1 + b1) W2 + b2; no BatchNorm, so replicas are exact.

  Its variables take `dtype` (the inputs are cast to it).
  """

  def __init__(self, dtype=tf.float32):
    super().__init__(name="mlp")
    self.dtype = dtype
    self.hidden = snt.Linear(NUM_HIDDEN, name="hidden")
    self.logits = snt.Linear(NUM_CLASSES, name="logits")

  def __call__(self, x, is_training, use_dropout=None):  # No dropout.
    del is_training
    return self.logits(tf.tanh(self.hidden(tf.cast(x, self.dtype))))


# ---------------------------------------------------------------- NumPy side.


def np_gradients(w, x, y):
  """Mean softmax cross-entropy of the MLP and its gradients, by hand."""
  pre = x @ w["hidden/w"] + w["hidden/b"]
  h = np.tanh(pre)
  logits = h @ w["logits/w"] + w["logits/b"]
  logits = logits - logits.max(axis=1, keepdims=True)
  p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  onehot = np.eye(NUM_CLASSES)[y]
  d_logits = (p - onehot) / len(y)
  d_h = d_logits @ w["logits/w"].T
  d_pre = d_h * (1.0 - h**2)
  return {
      "logits/w": h.T @ d_logits,
      "logits/b": d_logits.sum(axis=0),
      "hidden/w": x.T @ d_pre,
      "hidden/b": d_pre.sum(axis=0),
  }


def np_momentum(d, v, mu, nesterov):
  v = mu * v + d
  return (d + mu * v if nesterov else v), v


def np_sgd_update(w, g, vel, lr, mom, nesterov, wd):
  """One SGD step in place: L2 inside the (Nesterov) momentum."""
  for k in w:
    d = g[k] + wd * w[k]
    if mom:
      d, vel[k] = np_momentum(d, vel[k], mom, nesterov)
    w[k] = w[k] - lr * d


def np_sgd(w, batches, lr, mom, nesterov, wd):
  vel = {k: np.zeros_like(a) for k, a in w.items()}
  for x, y in batches:
    np_sgd_update(w, np_gradients(w, x, y), vel, lr, mom, nesterov, wd)
  return w


def np_entropy_sgd(w, batches, noise_of, num_outer, hp, conv):
  """Algorithm 1 of Chaudhari et al. (2017) plus the reference variants.

  `noise_of(t, l, name)` returns the N(0, I) draw for step t, inner step l.
  """
  L = hp["L"]
  lr, llr, g0, g1, eps, alpha, wd = (hp[k] for k in (
      "lr", "llr", "gamma", "scoping", "eps", "alpha", "wd"))
  outer_vel = {k: np.zeros_like(a) for k, a in w.items()}
  batch_iter = iter(batches)
  for t in range(num_outer):
    gamma = g0 * (1.0 + g1)**(t + conv.scoping_offset)
    x = {k: a.copy() for k, a in w.items()}
    xp = {k: a.copy() for k, a in w.items()}
    mu = {k: a.copy() for k, a in w.items()}
    inner_vel = {k: np.zeros_like(a) for k, a in w.items()}
    if conv.noise_scale == "sqrt_lr":
      sigma = np.sqrt(llr) * eps
    else:  # Lua: eps / sqrt(0.5 llr) added to the gradient, times llr.
      sigma = llr * eps / np.sqrt(0.5 * llr)
    new_weight = alpha if conv.alpha_weights == "new_sample" else 1 - alpha
    for l in range(L):
      bx, by = next(batch_iter)
      g = np_gradients(xp, bx, by)
      for k in w:
        d = g[k]
        if conv.inner_weight_decay == "before_momentum":
          d = d + wd * xp[k]
        if conv.inner_momentum:
          d, inner_vel[k] = np_momentum(d, inner_vel[k], conv.inner_momentum,
                                        conv.inner_nesterov)
        if conv.inner_weight_decay == "after_momentum":
          d = d + wd * xp[k]
        d = d - gamma * (x[k] - xp[k])
        xp[k] = xp[k] - llr * d + sigma * noise_of(t, l, k)
        mu[k] = (1 - new_weight) * mu[k] + new_weight * xp[k]
    scale = gamma if conv.outer_scale == "gamma" else 1.0
    for k in w:
      d = scale * (x[k] - mu[k])
      if conv.outer_weight_decay:
        d = d + wd * x[k]
      if conv.outer_momentum:
        d, outer_vel[k] = np_momentum(d, outer_vel[k], conv.outer_momentum,
                                      conv.outer_nesterov)
      w[k] = x[k] - lr * d
  return w


# ------------------------------------------------------------ Shared set-up.


def short_name(variable):
  # "mlp/hidden/w:0" -> "hidden/w"
  return "/".join(variable.name.split(":")[0].split("/")[-2:])


def run_tf(strategy, optimizer, x, y, num_outer, jit_compile=False,
           dtype=tf.float32):
  model = train_step_lib.build_model(strategy, lambda: MLP(dtype),
                                     [NUM_FEATURES])
  rng = np.random.RandomState(42)  # The same start under every strategy.
  for v in model.trainable_variables:
    v.assign(rng.normal(scale=0.5, size=v.shape).astype(
        dtype.as_numpy_dtype))
  initial = {short_name(v): v.numpy().astype(np.float64)
             for v in model.trainable_variables}
  dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
  iterator = iter(strategy.experimental_distribute_dataset(dataset))
  step = train_step_lib.make_train_step(
      model, optimizer, strategy, global_batch_size=BATCH,
      jit_compile=jit_compile)
  metrics = [step(iterator) for _ in range(num_outer)]
  final = {short_name(v): v for v in model.trainable_variables}
  return model, initial, final, metrics


def noise_lookup(model, seed, jit_compile=False, dtype=tf.float32):
  """The optimizer's noise draws; XLA and TF kernels draw differently."""
  draw = optimizers.langevin_noise
  if jit_compile:
    draw = tf.function(draw, jit_compile=True)
  names = [short_name(v) for v in model.trainable_variables]
  shapes = [v.shape for v in model.trainable_variables]

  @functools.lru_cache(maxsize=None)
  def step_noise(t, l):
    return [n.numpy().astype(np.float64) for n in draw(
        seed, tf.constant(t, tf.int64), tf.constant(l, tf.int64), shapes,
        dtype)]

  def noise_of(t, l, name):
    return step_noise(t, l)[names.index(name)]

  return noise_of


HYPER = dict(L=4, lr=0.7, llr=0.05, gamma=0.3, scoping=0.2, eps=0.05,
             alpha=0.75, wd=0.01)

CONVENTIONS = {
    "paper": optimizers.PAPER,
    "lua_reference": optimizers.LUA_REFERENCE,
    "outer_nesterov_pytorch_decay": dataclasses.replace(
        optimizers.PAPER, inner_momentum=0.5, inner_nesterov=False,
        outer_momentum=0.9, outer_nesterov=True, outer_weight_decay=True),
}


def make_entropy_sgd(conventions, jit_compile=False):
  """EntropySGD with HYPER, the named CONVENTIONS and noise seed 7."""
  return optimizers.EntropySGD(
      learning_rate=HYPER["lr"], num_langevin_steps=HYPER["L"],
      langevin_learning_rate=HYPER["llr"], gamma=HYPER["gamma"],
      scoping=HYPER["scoping"], noise=HYPER["eps"], alpha=HYPER["alpha"],
      weight_decay=HYPER["wd"], conventions=CONVENTIONS[conventions], seed=7,
      jit_compile=jit_compile)


class EntropySGDStepTest(tf.test.TestCase, parameterized.TestCase):

  def make_optimizer(self, conventions, jit_compile=False):
    return make_entropy_sgd(conventions, jit_compile)

  @parameterized.product(
      conventions=sorted(CONVENTIONS), jit_compile=[False, True])
  def test_matches_numpy_algorithm_1(self, conventions, jit_compile):
    num_outer = 3
    x, y = make_data(num_outer * HYPER["L"])
    optimizer = self.make_optimizer(conventions, jit_compile)
    model, initial, final, metrics = run_tf(
        tf.distribute.get_strategy(), optimizer, x, y, num_outer,
        jit_compile=jit_compile)
    expected = np_entropy_sgd(initial, batches_of(x, y),
                              noise_lookup(model, 7, jit_compile), num_outer, HYPER,
                              CONVENTIONS[conventions])
    assert_close_relative(self, final, expected)
    # Scoping really advances: gamma of the last step is gamma0 (1+g1)^t.
    offset = CONVENTIONS[conventions].scoping_offset
    self.assertAllClose(metrics[-1]["gamma"],
                        HYPER["gamma"] * 1.2**(num_outer - 1 + offset),
                        rtol=1e-6)

  def test_conventions_change_the_trajectory(self):
    x, y = make_data(2 * HYPER["L"])
    finals = []
    for name in ("paper", "lua_reference"):
      _, _, final, _ = run_tf(tf.distribute.get_strategy(),
                              self.make_optimizer(name), x, y, 2)
      finals.append(np.concatenate([v.numpy().ravel()
                                    for v in final.values()]))
    self.assertGreater(np.abs(finals[0] - finals[1]).max(), 1e-3)

  def test_noise_enters_the_trajectory(self):
    x, y = make_data(HYPER["L"])
    finals = []
    for seed in (1, 2):
      optimizer = self.make_optimizer("paper")
      optimizer.seed = seed
      _, _, final, _ = run_tf(tf.distribute.get_strategy(), optimizer, x, y,
                              1)
      finals.append(final["hidden/w"].numpy())
    self.assertGreater(np.abs(finals[0] - finals[1]).max(), 1e-5)

  def test_returns_metrics_of_the_outer_step(self):
    x, y = make_data(HYPER["L"])
    _, _, _, metrics = run_tf(tf.distribute.get_strategy(),
                              self.make_optimizer("paper"), x, y, 1)
    self.assertEqual(set(metrics[0]), {"loss", "accuracy", "gamma",
                                       "anchor_to_mean_distance"})
    self.assertBetween(float(metrics[0]["accuracy"]), 0.0, 1.0)
    self.assertGreater(float(metrics[0]["anchor_to_mean_distance"]), 0.0)


# (name, momentum, nesterov, weight_decay) of the SGD cases.
SGD_VARIANTS = (("plain", 0.0, False, 0.0),
                ("momentum", 0.9, False, 5e-3),
                ("nesterov", 0.9, True, 5e-3))


class SGDStepTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(*SGD_VARIANTS)
  def test_matches_numpy_sgd(self, momentum, nesterov, weight_decay):
    x, y = make_data(5)
    optimizer = optimizers.SGD(0.3, momentum=momentum, nesterov=nesterov,
                               weight_decay=weight_decay)
    _, initial, final, metrics = run_tf(tf.distribute.get_strategy(),
                                        optimizer, x, y, 5)
    expected = np_sgd(initial, batches_of(x, y), 0.3, momentum, nesterov,
                      weight_decay)
    assert_close_relative(self, final, expected)
    self.assertEqual(int(optimizer.step.numpy()), 5)
    self.assertEqual(set(metrics[0]), {"loss", "accuracy"})

  def test_loss_and_accuracy_match_numpy(self):
    x, y = make_data(1)
    _, initial, _, metrics = run_tf(tf.distribute.get_strategy(),
                                    optimizers.SGD(0.1), x, y, 1)
    w = initial
    logits = (np.tanh(x @ w["hidden/w"] + w["hidden/b"]) @ w["logits/w"] +
              w["logits/b"])
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    self.assertAllClose(metrics[0]["loss"],
                        -log_p[np.arange(len(y)), y].mean(), rtol=1e-5)
    self.assertAllClose(metrics[0]["accuracy"],
                        (logits.argmax(axis=1) == y).mean())


def np_sam_eps(w, g, rho, adaptive, eta):
  """SAM's / ASAM's ascent step, transcribed."""
  t = {k: (np.abs(w[k]) + eta) if adaptive else np.ones_like(w[k]) for k in w}
  norm = np.sqrt(sum(np.sum((t[k] * g[k])**2) for k in w))
  return {k: rho * t[k]**2 * g[k] / norm for k in w}


def np_sam(w, batches, lr, rho, adaptive=False, eta=0.01, mom=0.9,
           nesterov=True, wd=0.0, replicas=1, perturbation="per_replica"):
  """SAM with a Nesterov/SGD base step; one batch per step, split evenly
  over `replicas` (each perturbed by its own gradient unless
  "synchronized")."""
  vel = {k: np.zeros_like(a) for k, a in w.items()}
  for x, y in batches:
    size = len(y) // replicas
    shards = [(x[j * size:(j + 1) * size], y[j * size:(j + 1) * size])
              for j in range(replicas)]
    if perturbation == "synchronized" or replicas == 1:
      eps = [np_sam_eps(w, np_gradients(w, x, y), rho, adaptive, eta)] * (
          replicas)
    else:
      eps = [np_sam_eps(w, np_gradients(w, xs, ys), rho, adaptive, eta)
             for xs, ys in shards]
    g = {k: np.zeros_like(a) for k, a in w.items()}
    for (xs, ys), e in zip(shards, eps):
      shard_g = np_gradients({k: w[k] + e[k] for k in w}, xs, ys)
      for k in w:
        g[k] += shard_g[k] / replicas
    np_sgd_update(w, g, vel, lr, mom, nesterov, wd)
  return w


class BatchNormMLP(snt.Module):
  """x -> BN(x W1) -> tanh -> logits: for BatchNorm statistics under SAM."""

  def __init__(self):
    super().__init__(name="bn_mlp")
    self.hidden = snt.Linear(NUM_HIDDEN, with_bias=False, name="hidden")
    self.bn = snt.BatchNorm(True, True, decay_rate=0.5, name="bn")
    self.logits = snt.Linear(NUM_CLASSES, name="logits")

  def __call__(self, x, is_training, use_dropout=None):  # No dropout.
    return self.logits(tf.tanh(self.bn(self.hidden(x),
                                       is_training=is_training)))


class SAMStepTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("sam", False, 0.05, 0.0), ("sam_weight_decay", False, 0.2, 5e-3),
      ("asam", True, 0.5, 5e-3))
  def test_matches_numpy(self, adaptive, rho, weight_decay):
    x, y = make_data(4)
    optimizer = optimizers.SAM(0.3, rho=rho, adaptive=adaptive, eta=0.01,
                               momentum=0.9, nesterov=True,
                               weight_decay=weight_decay)
    _, initial, final, metrics = run_tf(tf.distribute.get_strategy(),
                                        optimizer, x, y, 4)
    expected = np_sam(initial, batches_of(x, y), 0.3, rho, adaptive, 0.01,
                      0.9, True, weight_decay)
    assert_close_relative(self, final, expected)
    # One batch per step (4 steps used the 4 batches), one counted step.
    self.assertEqual(int(optimizer.step.numpy()), 4)
    self.assertEqual((optimizer.gradient_evaluations_per_step,
                      optimizer.batches_per_step), (2, 1))
    # Not SGD: the ascent changes the trajectory.
    sgd = np_sgd(dict(initial), batches_of(x, y), 0.3, 0.9, True,
                 weight_decay)
    self.assertGreater(max(np.max(np.abs(final[k].numpy() - sgd[k]))
                           for k in sgd), 1e-4)

  def test_loss_is_measured_at_w(self):
    x, y = make_data(1)
    _, initial, _, metrics = run_tf(tf.distribute.get_strategy(),
                                    optimizers.SAM(0.1, rho=0.5), x, y, 1)
    w = initial
    logits = (np.tanh(x @ w["hidden/w"] + w["hidden/b"]) @ w["logits/w"] +
              w["logits/b"])
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    self.assertAllClose(metrics[0]["loss"],
                        -log_p[np.arange(len(y)), y].mean(), rtol=1e-5)

  @parameterized.parameters("per_replica", "synchronized")
  def test_two_replicas_match_numpy(self, perturbation):
    global_batch, num_steps = 2 * BATCH, 3
    x, y = make_data(2 * num_steps)
    optimizer = optimizers.SAM(0.3, rho=0.3, momentum=0.9, nesterov=True,
                               weight_decay=1e-3, perturbation=perturbation)
    final, _ = run_steps(mirrored_strategy(), optimizer, x, y, global_batch,
                         num_steps)
    rng = np.random.RandomState(42)  # run_steps' start.
    model = MLP()
    model(tf.zeros([1, NUM_FEATURES]), is_training=False)
    initial = {short_name(v): rng.normal(scale=0.5, size=v.shape).astype(
        np.float32).astype(np.float64) for v in model.trainable_variables}
    batches = [(x[i:i + global_batch].astype(np.float64),
                y[i:i + global_batch])
               for i in range(0, len(y), global_batch)]
    expected = np_sam(initial, batches, 0.3, 0.3, mom=0.9, nesterov=True,
                      wd=1e-3, replicas=2, perturbation=perturbation)
    for name in expected:
      copies = final[name].values
      self.assertAllEqual(copies[0].numpy(), copies[1].numpy())
      self.assertAllClose(copies[0].numpy(), expected[name], rtol=1e-4,
                          atol=1e-5)
    other = np_sam(dict(initial), batches, 0.3, 0.3, mom=0.9, nesterov=True,
                   wd=1e-3, replicas=2,
                   perturbation={"per_replica": "synchronized",
                                 "synchronized": "per_replica"}[perturbation])
    self.assertGreater(max(np.max(np.abs(other[k] - expected[k]))
                           for k in other), 1e-4)  # The modes differ.

  def test_batch_norm_statistics_see_the_first_pass_only(self):
    x, y = make_data(1)
    strategy = tf.distribute.get_strategy()

    def statistics_after(optimizer):
      tf.random.set_seed(0)
      model = train_step_lib.build_model(strategy, BatchNormMLP,
                                         [NUM_FEATURES])
      dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
      step = train_step_lib.make_train_step(model, optimizer, strategy,
                                            BATCH)
      step(iter(dataset))
      return [v.numpy() for v in model.bn.variables if not v.trainable]

    # SGD's single pass at w updates the statistics as SAM's first pass.
    sam = statistics_after(optimizers.SAM(0.5, rho=2.0))
    sgd = statistics_after(optimizers.SGD(0.5))
    self.assertNotEmpty(sam)
    for a, b in zip(sam, sgd):
      self.assertAllClose(a, b, rtol=1e-6, atol=1e-7)

  def test_refuses_float16_loss_scaling(self):
    model = train_step_lib.build_model(tf.distribute.get_strategy(), MLP,
                                       [NUM_FEATURES])
    with self.assertRaisesRegex(ValueError, "SAM with float16"):
      train_step_lib.make_train_step(
          model, optimizers.SAM(0.1), tf.distribute.get_strategy(), BATCH,
          loss_scale=precision.DynamicLossScale())


class Float64Test(tf.test.TestCase, parameterized.TestCase):
  """float64 models train in float64: Python-float hyperparameters reach
  them without a float32 round trip, so they follow NumPy to round-off."""

  @parameterized.parameters(sorted(CONVENTIONS))
  def test_entropy_sgd_matches_numpy(self, conventions):
    num_outer = 3
    x, y = make_data(num_outer * HYPER["L"])
    optimizer = make_entropy_sgd(conventions)
    model, initial, final, metrics = run_tf(
        tf.distribute.get_strategy(), optimizer, x, y, num_outer,
        dtype=tf.float64)
    self.assertEqual({v.dtype for v in model.trainable_variables},
                     {tf.float64})
    expected = np_entropy_sgd(
        initial, batches_of(x, y),
        noise_lookup(model, 7, dtype=tf.float64), num_outer, HYPER,
        CONVENTIONS[conventions])
    assert_close_relative(self, final, expected, rtol=1e-12)
    self.assertEqual(metrics[-1]["loss"].dtype, tf.float32)

  @parameterized.named_parameters(*SGD_VARIANTS)
  def test_sgd_matches_numpy(self, momentum, nesterov, weight_decay):
    x, y = make_data(5)
    optimizer = optimizers.SGD(0.3, momentum=momentum, nesterov=nesterov,
                               weight_decay=weight_decay)
    _, initial, final, _ = run_tf(tf.distribute.get_strategy(), optimizer,
                                  x, y, 5, dtype=tf.float64)
    expected = np_sgd(initial, batches_of(x, y), 0.3, momentum, nesterov,
                      weight_decay)
    assert_close_relative(self, final, expected, rtol=1e-12)

  def test_float64_variable_learning_rate(self):
    x, y = make_data(3)
    learning_rate = tf.Variable(0.3, dtype=tf.float64)
    _, initial, final, _ = run_tf(tf.distribute.get_strategy(),
                                  optimizers.SGD(learning_rate), x, y, 3,
                                  dtype=tf.float64)
    expected = np_sgd(initial, batches_of(x, y), 0.3, 0.0, False, 0.0)
    assert_close_relative(self, final, expected, rtol=1e-12)


class MirroredStrategyTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters("entropy_sgd", "nesterov")
  def test_two_replicas_follow_the_default_strategy(self, name):
    devices = tf.config.list_logical_devices("CPU")
    self.assertLen(devices, 2, "the test main sets up 2 logical CPUs")

    def make():
      if name == "nesterov":
        return optimizers.SGD(0.3, momentum=0.9, nesterov=True,
                              weight_decay=1e-3)
      return optimizers.EntropySGD(
          learning_rate=0.7, num_langevin_steps=3, langevin_learning_rate=0.05,
          gamma=0.3, scoping=0.2, noise=0.05, weight_decay=0.01,
          conventions="lua_reference", seed=3)

    num_outer = 3
    x, y = make_data(num_outer * 3)
    mirrored = tf.distribute.MirroredStrategy([d.name for d in devices])
    self.assertEqual(mirrored.num_replicas_in_sync, 2)
    _, _, single, single_metrics = run_tf(tf.distribute.get_strategy(),
                                          make(), x, y, num_outer)
    _, _, replicated, replicated_metrics = run_tf(mirrored, make(), x, y,
                                                  num_outer)
    for name_ in single:
      copies = replicated[name_].values
      self.assertLen(copies, 2)
      # Same all-reduced gradient and same noise: bit-identical replicas.
      self.assertAllEqual(copies[0].numpy(), copies[1].numpy())
      self.assertAllClose(copies[0].numpy(), single[name_].numpy(),
                          rtol=1e-5, atol=1e-6)
    self.assertAllClose(single_metrics[-1]["loss"],
                        replicated_metrics[-1]["loss"], rtol=1e-5)

  def test_batch_not_divisible_by_replicas_is_refused(self):
    mirrored = tf.distribute.MirroredStrategy(
        [d.name for d in tf.config.list_logical_devices("CPU")])
    model = train_step_lib.build_model(mirrored, MLP, [NUM_FEATURES])
    with self.assertRaisesRegex(ValueError, "not divisible by the 2"):
      train_step_lib.make_train_step(model, optimizers.SGD(0.1), mirrored,
                                     global_batch_size=7)


def make_esgd(cls=optimizers.EntropySGD, **kwargs):
  settings = dict(learning_rate=0.5, num_langevin_steps=3,
                  langevin_learning_rate=0.05, gamma=0.3, scoping=0.2,
                  noise=0.05, weight_decay=0.01, conventions="lua_reference",
                  seed=3)
  settings.update(kwargs)
  return cls(**settings)


def run_steps(strategy, optimizer, x, y, batch, num_outer):
  """Like run_tf, with any global batch; returns (final weights, metrics)."""
  model = train_step_lib.build_model(strategy, MLP, [NUM_FEATURES])
  rng = np.random.RandomState(42)
  for v in model.trainable_variables:
    v.assign(rng.normal(scale=0.5, size=v.shape).astype(np.float32))
  dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
  iterator = iter(strategy.experimental_distribute_dataset(dataset))
  step = train_step_lib.make_train_step(model, optimizer, strategy, batch)
  metrics = [step(iterator) for _ in range(num_outer)]
  return {short_name(v): v for v in model.trainable_variables}, metrics


class ParleTest(tf.test.TestCase, parameterized.TestCase):

  def test_one_replica_is_entropy_sgd(self):
    x, y = make_data(6)
    strategy = tf.distribute.get_strategy()
    esgd, _ = run_steps(strategy, make_esgd(), x, y, BATCH, 2)
    parle, _ = run_steps(strategy, make_esgd(optimizers.Parle, rho=2.0), x,
                         y, BATCH, 2)
    for name in esgd:
      self.assertAllClose(parle[name], esgd[name], rtol=1e-6, atol=1e-7)

  @parameterized.parameters(0.5, float("inf"))
  def test_identical_data_and_noise_on_replicas_is_entropy_sgd(self, rho):
    x, y = make_data(6)
    # Each global batch of 2 * BATCH holds the same BATCH twice, so both
    # replicas see the same data; without noise their chains coincide.
    doubled_x = np.concatenate([np.concatenate([x[i:i + BATCH]] * 2)
                                for i in range(0, len(x), BATCH)])
    doubled_y = np.concatenate([np.concatenate([y[i:i + BATCH]] * 2)
                                for i in range(0, len(y), BATCH)])
    esgd, _ = run_steps(tf.distribute.get_strategy(), make_esgd(noise=0.0),
                        x, y, BATCH, 2)
    parle, _ = run_steps(mirrored_strategy(),
                         make_esgd(optimizers.Parle, noise=0.0, rho=rho),
                         doubled_x, doubled_y, 2 * BATCH, 2)
    for name in esgd:
      for copy in parle[name].values:
        self.assertAllClose(copy, esgd[name], rtol=1e-5, atol=1e-6)

  @parameterized.parameters((1.0, 0.5), (float("inf"), 1.0))
  def test_replicas_diverge_inside_the_loop_and_recouple(self, rho,
                                                         coupling):
    x, y = make_data(6)
    optimizer = make_esgd(optimizers.Parle, rho=rho, rho_scoping=0.0)
    weights, metrics = run_steps(mirrored_strategy(), optimizer, x, y,
                                 2 * BATCH, 1)
    # Before coupling each replica sits at distance d from the mean, so the
    # two replicas were 2d apart; coupling shrinks that by (1 - c).
    spread = float(metrics[0]["distance_to_replica_mean"])
    self.assertGreater(spread, 1e-3)
    apart = np.sqrt(sum(
        np.sum(np.square(v.values[0].numpy() - v.values[1].numpy()))
        for v in weights.values()))
    self.assertAllClose(apart, (1.0 - coupling) * 2 * spread, rtol=1e-4,
                        atol=1e-6)

  def test_replicas_draw_their_own_noise(self):
    x, y = make_data(6)
    doubled = lambda a: np.concatenate(  # pylint: disable=g-long-lambda
        [np.concatenate([a[i:i + BATCH]] * 2) for i in range(0, len(a),
                                                              BATCH)])
    _, metrics = run_steps(mirrored_strategy(),
                           make_esgd(optimizers.Parle, rho=1.0),
                           doubled(x), doubled(y), 2 * BATCH, 1)
    # Same data on both replicas: only the noise can separate them.
    self.assertGreater(float(metrics[0]["distance_to_replica_mean"]), 1e-4)

  @parameterized.parameters(("entropy_sgd", 3), ("parle", 1))
  def test_reductions_per_outer_step(self, name, expected):
    x, y = make_data(6)
    optimizer = (make_esgd(optimizers.Parle) if name == "parle"
                 else make_esgd())
    with distribution.record_all_reduces() as calls:
      run_steps(mirrored_strategy(), optimizer, x, y, 2 * BATCH, 1)
    count, num_bytes = distribution.per_step(calls, loop_iterations=3)
    self.assertEqual(count, expected)
    weight_bytes = 4 * (NUM_FEATURES * NUM_HIDDEN + NUM_HIDDEN +
                        NUM_HIDDEN * NUM_CLASSES + NUM_CLASSES)
    self.assertEqual(num_bytes, expected * weight_bytes)


# ---------------------------------------------------------- Mixed precision.


class MixedMLP(snt.Module):
  """x -> relu(BN(x W1)) W2 + b2 computed in `compute_dtype` (None: float32),
  over float32 variables, returning float32 logits (see `precision`).

  `batch_norm=False`: relu(x W1 + b1) W2 + b2, whose variables have the
  shapes of `MLP`'s (collectives of several MirroredStrategy objects in one
  process share instance keys, and TensorFlow refuses a key reused with
  another shape).
  """

  def __init__(self, compute_dtype=None, hidden=NUM_HIDDEN, batch_norm=True):
    super().__init__(name="mixed_mlp")
    self.compute_dtype = compute_dtype
    self.hidden = precision.Linear(hidden, with_bias=not batch_norm,
                                   name="hidden")
    self.bn = (precision.BatchNorm(True, True, decay_rate=0.9, name="bn")
               if batch_norm else None)
    self.logits = precision.Linear(NUM_CLASSES, name="logits")

  def __call__(self, x, is_training, use_dropout=None):  # No dropout.
    net = self.hidden(precision.to_compute(x, self.compute_dtype))
    if self.bn is not None:
      net = self.bn(net, is_training=is_training)
    return precision.logits_to_float32(self.logits(tf.nn.relu(net)))


# Inner and outer momentum, so that every kind of optimizer state exists.
MOMENTA = dataclasses.replace(optimizers.LUA_REFERENCE, outer_momentum=0.5)


def mixed_run(compute_dtype, optimizer, batches, num_outer, loss_scale=None,
              hidden=NUM_HIDDEN, num_steps=1):
  """Trains MixedMLP from fixed weights on `batches` (a list of (x, y))."""
  strategy = tf.distribute.get_strategy()
  model = train_step_lib.build_model(
      strategy, lambda: MixedMLP(compute_dtype, hidden), [NUM_FEATURES])
  rng = np.random.RandomState(7)
  for v in model.trainable_variables:
    v.assign(rng.normal(scale=0.5, size=v.shape).astype(np.float32))
  xs = np.concatenate([x for x, _ in batches])
  ys = np.concatenate([y for _, y in batches])
  dataset = tf.data.Dataset.from_tensor_slices((xs, ys)).batch(
      len(batches[0][1]))
  iterator = iter(dataset.repeat())
  step = train_step_lib.make_train_step(model, optimizer, strategy,
                                        len(batches[0][1]),
                                        loss_scale=loss_scale)
  metrics = [step(iterator, num_steps) for _ in range(num_outer)]
  return model, metrics


def data_batches(num_batches, seed=0):
  x, y = make_data(num_batches, seed)
  return [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(x), BATCH)]


def values(variables):
  return [v.numpy().copy() for v in variables]


def float16_step(optimizer, loss_scale):
  """A float16 MLP, its initial weights, its train step and a 1-batch iterator."""
  strategy = tf.distribute.get_strategy()
  model = train_step_lib.build_model(
      strategy, lambda: MixedMLP(tf.float16), [NUM_FEATURES])
  before = values(model.trainable_variables)
  x, y = data_batches(1)[0]
  iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
  step = train_step_lib.make_train_step(model, optimizer, strategy, BATCH,
                                        loss_scale=loss_scale)
  return model, before, step, iterator


class MixedPrecisionTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters((tf.bfloat16,), (tf.float16,))
  def test_state_stays_float32(self, compute_dtype):
    loss_scale = (precision.DynamicLossScale()
                  if compute_dtype == tf.float16 else None)
    optimizer = make_esgd(conventions=MOMENTA)
    model, metrics = mixed_run(compute_dtype, optimizer, data_batches(6), 2,
                               loss_scale)
    bn = model.bn
    state = {
        "parameters": model.trainable_variables,
        "batch_norm_statistics": [bn.moving_mean.average,
                                  bn.moving_variance.average],
        "anchor": optimizer.anchor, "mean": optimizer.mean,
        "inner_velocities": optimizer.inner_velocities,
        "outer_velocities": optimizer.outer_velocities,
    }
    for name, variables in state.items():
      self.assertNotEmpty(variables, name)
      for v in variables:
        self.assertEqual(v.dtype, tf.float32, f"{name}: {v.name}")
    self.assertEqual(metrics[-1]["loss"].dtype, tf.float32)
    # SGD's momentum buffers too.
    sgd = optimizers.SGD(0.1, momentum=0.9, nesterov=True)
    mixed_run(compute_dtype, sgd, data_batches(2), 1, loss_scale)
    self.assertEqual({v.dtype for v in sgd.velocities}, {tf.float32})

  def test_noise_reaches_the_float32_sample(self):
    # One SGLD step in bfloat16 compute, two noise seeds: x' differs by the
    # noise (std sqrt(eta') eps each, paper conventions), which a bfloat16 x'
    # (resolution ~4e-3 relative at |x'| ~ 0.5) would round away.
    eps, langevin_lr = 1e-4, 0.1
    samples = []
    for seed in (0, 1):
      model = train_step_lib.build_model(
          tf.distribute.get_strategy(),
          lambda: MixedMLP(tf.bfloat16, hidden=256), [NUM_FEATURES])
      rng = np.random.RandomState(7)
      for v in model.trainable_variables:
        v.assign(rng.normal(scale=0.5, size=v.shape).astype(np.float32))
      optimizer = optimizers.EntropySGD(
          num_langevin_steps=1, langevin_learning_rate=langevin_lr,
          noise=eps, conventions="paper", seed=seed)
      parameters = model.trainable_variables
      optimizer.initialize(parameters)
      optimizer.begin_outer_step(parameters)
      x, y = data_batches(1)[0]
      with tf.GradientTape() as tape:
        loss = tf.reduce_mean(train_step_lib.classification_loss(
            model(x, is_training=True), y))
      optimizer.apply(tape.gradient(loss, parameters), parameters)
      samples.append(np.concatenate([v.numpy().ravel() for v in parameters]))
    difference = samples[0] - samples[1]
    expected_std = np.sqrt(2.0) * np.sqrt(langevin_lr) * eps
    self.assertGreater(difference.size, 2000)
    self.assertAllClose(np.std(difference), expected_std, rtol=0.05)
    # Rounded to bfloat16, most of that difference would be gone.
    rounded = [tf.cast(tf.cast(s, tf.bfloat16), tf.float32).numpy()
               for s in samples]
    self.assertGreater(np.mean(rounded[0] == rounded[1]), 0.9)

  def test_bfloat16_tracks_float32(self):
    # Same weights, data and noise; 4 outer steps of L=3. Tolerance: the
    # distance between the two runs' weights is below 1% of how far float32
    # moved them (observed 0.07%), and the losses agree to 0.3% (relative;
    # observed 0.03%).
    batches = data_batches(12)
    runs = {}
    for compute_dtype in (None, tf.bfloat16):
      model, metrics = mixed_run(compute_dtype, make_esgd(conventions="paper",
                                                          learning_rate=1.0),
                                 batches, 4)
      runs[compute_dtype] = (values(model.trainable_variables),
                             [float(m["loss"]) for m in metrics])
    start = values(mixed_run(None, make_esgd(), batches, 0)[0]
                   .trainable_variables)
    (f32, f32_losses), (b16, b16_losses) = runs[None], runs[tf.bfloat16]
    moved = np.sqrt(sum(np.sum((a - b)**2) for a, b in zip(f32, start)))
    apart = np.sqrt(sum(np.sum((a - b)**2) for a, b in zip(f32, b16)))
    self.assertGreater(moved, 0.05)
    self.assertLess(apart / moved, 0.01)
    self.assertAllClose(b16_losses, f32_losses, rtol=3e-3)

  def test_overflow_skips_the_sgld_step_and_halves_the_scale(self):
    # An absurd loss scale overflows float16: the only SGLD step (L=1) is
    # skipped, so x', mu and the momentum stay, the outer step then moves
    # x by nothing (mu = x); l and t still advance.
    loss_scale = precision.DynamicLossScale(initial_scale=2.0**40)
    optimizer = make_esgd(conventions=MOMENTA, num_langevin_steps=1)
    model, before, step, iterator = float16_step(optimizer, loss_scale)
    metrics = step(iterator)
    for name, variables in (("weights", model.trainable_variables),
                            ("anchor", optimizer.anchor),
                            ("mean", optimizer.mean)):
      for value, variable in zip(before, variables):
        self.assertAllEqual(variable.numpy(), value, name)
    for v in optimizer.inner_velocities:
      self.assertAllEqual(v.numpy(), np.zeros(v.shape))
    self.assertEqual(int(optimizer.inner_step.numpy()), 1)
    self.assertEqual(int(optimizer.step.numpy()), 1)
    self.assertEqual(float(metrics["loss_scale"]), 2.0**39)
    self.assertEqual(float(metrics["skipped_updates"]), 1.0)
    self.assertEqual(int(loss_scale.skipped_updates.numpy()), 1)
    self.assertTrue(np.isnan(float(metrics["loss"])))  # No applied update.

  def test_a_skipped_step_leaves_the_others_exact(self):
    # L=3 on [good, inf, good] equals L=2 on [good, good] (no noise, so the
    # keys do not matter here): the inf batch changes nothing but l.
    good = data_batches(2)
    bad = (np.full_like(good[0][0], np.inf), good[0][1])
    runs = []
    for batches, num_steps in (([good[0], bad, good[1]], 3), (good, 2)):
      optimizer = make_esgd(conventions=MOMENTA, noise=0.0,
                            num_langevin_steps=num_steps)
      loss_scale = precision.DynamicLossScale(initial_scale=256.0)
      model, metrics = mixed_run(tf.float16, optimizer, batches, 1,
                                 loss_scale)
      runs.append((values(model.trainable_variables), metrics[0], optimizer,
                   loss_scale))
    (skipping, skip_metrics, optimizer, loss_scale), (clean, clean_metrics,
                                                      _, _) = runs
    for a, b in zip(skipping, clean):
      self.assertAllClose(a, b, rtol=1e-6, atol=1e-7)
    self.assertAllClose(skip_metrics["loss"], clean_metrics["loss"])
    self.assertEqual(float(skip_metrics["skipped_updates"]), 1.0)
    self.assertEqual(float(skip_metrics["loss_scale"]), 128.0)
    self.assertEqual(int(optimizer.inner_step.numpy()), 3)

  def test_sgd_overflow_counts_the_step_and_changes_nothing(self):
    loss_scale = precision.DynamicLossScale(initial_scale=2.0**40)
    sgd = optimizers.SGD(0.1, momentum=0.9, nesterov=True)
    model, before, step, iterator = float16_step(sgd, loss_scale)
    metrics = step(iterator, 30)  # Scale 2^40 halves to finite gradients.
    skipped = int(float(metrics["skipped_updates"]))
    self.assertBetween(skipped, 1, 29)
    self.assertEqual(int(sgd.step.numpy()), 30)  # Skipped ones count too.
    self.assertEqual(float(metrics["loss_scale"]), 2.0**(40 - skipped))
    self.assertTrue(np.isfinite(float(metrics["loss"])))
    changed = [not np.array_equal(a, v.numpy())
               for a, v in zip(before, model.trainable_variables)]
    self.assertTrue(any(changed))

  @parameterized.parameters(False, True)
  def test_overflow_on_two_replicas(self, parle):
    # Replica 1's half of the first batch is Inf: every replica skips that
    # update (Parle's too), the next one is applied, copies stay identical.
    x, y = make_data(4)
    x[BATCH:2 * BATCH] = np.inf
    strategy = mirrored_strategy()
    with strategy.scope():
      loss_scale = precision.DynamicLossScale(initial_scale=64.0)
    optimizer = (make_esgd(optimizers.Parle, num_langevin_steps=2, rho=1.0)
                 if parle else make_esgd(num_langevin_steps=2))
    model = train_step_lib.build_model(
        strategy, lambda: MixedMLP(tf.float16, batch_norm=False),
        [NUM_FEATURES])
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(2 * BATCH)
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    step = train_step_lib.make_train_step(model, optimizer, strategy,
                                          2 * BATCH, loss_scale=loss_scale)
    metrics = step(iterator)
    self.assertEqual(float(metrics["skipped_updates"]), 1.0)
    self.assertEqual(float(metrics["loss_scale"]), 32.0)
    self.assertTrue(np.isfinite(float(metrics["loss"])))
    for v in model.trainable_variables:
      copies = [c.numpy() for c in v.values]
      self.assertTrue(np.all(np.isfinite(copies[0])))
      if not parle:
        self.assertAllEqual(copies[0], copies[1])
    self.assertEqual(int(optimizer.inner_step.numpy()), 2)

  def test_float32_is_unchanged_by_the_precision_layers(self):
    # compute_dtype=None adds no cast: the MLP of plain Sonnet layers and
    # the precision layers follow bit-identical trajectories.
    batches = data_batches(6)
    plain = []
    for layer_classes in ((snt.Linear, snt.BatchNorm),
                          (precision.Linear, precision.BatchNorm)):
      linear, batch_norm = layer_classes

      class Net(snt.Module):

        def __init__(self):
          super().__init__(name="mixed_mlp")
          self.hidden = linear(NUM_HIDDEN, with_bias=False, name="hidden")
          self.bn = batch_norm(True, True, decay_rate=0.9, name="bn")
          self.logits = linear(NUM_CLASSES, name="logits")

        def __call__(self, x, is_training, use_dropout=None):  # No dropout.
          net = tf.nn.relu(self.bn(self.hidden(x), is_training=is_training))
          return self.logits(net)

      strategy = tf.distribute.get_strategy()
      model = train_step_lib.build_model(strategy, Net, [NUM_FEATURES])
      rng = np.random.RandomState(7)
      for v in model.trainable_variables:
        v.assign(rng.normal(scale=0.5, size=v.shape).astype(np.float32))
      xs = np.concatenate([x for x, _ in batches])
      ys = np.concatenate([y for _, y in batches])
      iterator = iter(tf.data.Dataset.from_tensor_slices((xs, ys)).batch(
          BATCH))
      step = train_step_lib.make_train_step(model, make_esgd(), strategy,
                                            BATCH)
      step(iterator)
      step(iterator)
      plain.append(values(model.variables))
    for a, b in zip(*plain):
      self.assertAllEqual(a, b)


def setUpModule():
  distribution.logical_cpus(2)  # Before TensorFlow starts up.


if __name__ == "__main__":
  tf.test.main()
