"""The memory-traffic floor of an optimizer's update, beside its measured time.

On a small, wide model the update itself dominates a gradient evaluation,
and an elementwise update cannot run faster than the bytes it must move at
the machine's memory bandwidth. Per parameter (float32, 4 bytes), at the
floor (every tensor read or written once, the noise drawn in registers):

* Nesterov SGD: reads x, g, v; writes x, v -> 5 passes;
* an SGLD step of Entropy-SGD with inner momentum: reads x', g, x, mu, v;
  writes x', mu, v -> 8 passes (without momentum: 6);
* the outer step: reads x, mu (and the outer buffer); writes x -> 3 passes.

`stream_bandwidth` measures the bandwidth the way STREAM's "scale" kernel
does (b = s a over arrays far larger than the caches), in this process, with
TensorFlow's own multi-threaded elementwise kernels; `update_seconds` times
the optimizer's `apply` alone, on fixed gradients, with no forward or
backward pass.
"""

import time

import numpy as np
import tensorflow as tf

BYTES = 4  # float32


def floor_passes(optimizer) -> int:
  """Full passes over the parameters one `apply` must make at the floor."""
  name = type(optimizer).__name__
  if name == "SGD":
    return 5 if optimizer.momentum > 0 else 3
  if name in ("EntropySGD", "Parle"):
    return 8 if optimizer.conventions.inner_momentum > 0 else 6
  if name == "SAM":
    return 5  # The descent; the ascent is 3 more (reads w, g; writes w).
  if name == "Adam":
    return 7  # Reads x, g, m, v; writes x, m, v.
  raise ValueError(f"no floor model for {name}")


def stream_bandwidth(num_floats: int = 1 << 26, repeats: int = 5) -> float:
  """Bytes per second of b = 3 a on two float32 arrays of `num_floats`."""
  a = tf.Variable(tf.ones([num_floats], tf.float32))
  b = tf.Variable(tf.zeros([num_floats], tf.float32))

  @tf.function
  def scale():
    b.assign(3.0 * a)
    return b[0]

  float(scale())  # Warm up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    float(scale())
    times.append(time.perf_counter() - start)
  return 2 * BYTES * num_floats / min(times)


def update_seconds(optimizer, parameters, repeats: int = 20,
                   rounds: int = 3) -> float:
  """Seconds per `apply` call on fixed gradients (fastest round)."""
  gradients = [tf.random.stateless_normal(p.shape, [7, i]) * 1e-3
               for i, p in enumerate(parameters)]
  optimizer.initialize(parameters)

  @tf.function
  def loop():
    optimizer.begin_outer_step(parameters)
    for _ in tf.range(repeats):
      optimizer.apply(gradients, parameters)
    optimizer.end_outer_step(parameters)
    return parameters[0][0]

  float(np.ravel(loop())[0])  # Trace and warm up.
  best = float("inf")
  for _ in range(rounds):
    start = time.perf_counter()
    float(np.ravel(loop())[0])
    best = min(best, (time.perf_counter() - start) / repeats)
  return best


def floor_report(name, optimizer, parameters, bandwidth) -> str:
  """One line: bytes at the floor, floor time, measured update time."""
  count = sum(int(np.prod(p.shape)) for p in parameters)
  passes = floor_passes(optimizer)
  floor_bytes = passes * BYTES * count
  floor = floor_bytes / bandwidth
  measured = update_seconds(optimizer, parameters)
  return (f"{name}: floor {passes} passes x {count:,} parameters = "
          f"{floor_bytes / 1e6:.1f} MB per update, {floor * 1e3:.2f} ms at "
          f"{bandwidth / 1e9:.1f} GB/s; measured update alone "
          f"{measured * 1e3:.2f} ms ({measured / floor:.2f}x the floor)")
