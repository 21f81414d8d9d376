"""The memory-traffic floor of an optimizer's update, beside its measured time.

On a small, wide model the update itself dominates a gradient evaluation,
and an elementwise update cannot run faster than the bytes it must move at
the machine's memory bandwidth. Per parameter (float32, 4 bytes), at the
floor (every tensor read or written once, the noise drawn in registers):

* Nesterov SGD: reads x, g, v; writes x, v -> 5 passes;
* an SGLD step of Entropy-SGD with inner momentum: reads x', g, x, mu, v;
  writes x', mu, v -> 8 passes (without momentum: 6);
* the outer step: reads x, mu; writes x -> 3 passes (5 with outer
  momentum: its buffer is read and written too); it runs once per L SGLD
  steps.

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


def outer_floor_passes(optimizer) -> int:
  """Full passes the outer step of Entropy-SGD must make at the floor."""
  return 5 if optimizer.conventions.outer_momentum > 0 else 3


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
                   rounds: int = 3, outer: bool = False) -> float:
  """Seconds per `apply` call on fixed gradients (fastest round); with
  `outer`, per `end_outer_step` call instead."""
  gradients = [tf.random.stateless_normal(p.shape, [7, i]) * 1e-3
               for i, p in enumerate(parameters)]
  optimizer.initialize(parameters)

  @tf.function
  def loop():
    optimizer.begin_outer_step(parameters)
    for _ in tf.range(repeats):
      if outer:
        optimizer.end_outer_step(parameters)
      else:
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


def _line(label, passes, count, bandwidth, measured) -> str:
  floor_bytes = passes * BYTES * count
  floor = floor_bytes / bandwidth
  return (f"{label}: floor {passes} passes x {count:,} parameters = "
          f"{floor_bytes / 1e6:.1f} MB, {floor * 1e3:.2f} ms at "
          f"{bandwidth / 1e9:.1f} GB/s; measured alone "
          f"{measured * 1e3:.2f} ms ({measured / floor:.2f}x the floor)")


def floor_report(name, optimizer, parameters, bandwidth) -> str:
  """Lines of bytes at the floor, floor time and measured time: of one
  `apply`, and for Entropy-SGD also of the outer step."""
  count = sum(int(np.prod(p.shape)) for p in parameters)
  lines = [_line(f"{name} update", floor_passes(optimizer), count, bandwidth,
                 update_seconds(optimizer, parameters))]
  if type(optimizer).__name__ == "EntropySGD":
    lines.append(_line(f"{name} outer step", outer_floor_passes(optimizer),
                       count, bandwidth,
                       update_seconds(optimizer, parameters, outer=True)))
  return "\n".join(lines)
