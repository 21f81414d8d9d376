"""The Langevin noise: reproducible standard normal draws, fast on CPUs.

Each SGLD step of Entropy-SGD adds eps * sqrt(eta') * N(0, I) to every
parameter. On small, wide models that draw costs more than the gradient:
TensorFlow's `stateless_normal` takes about 9 ms for mnistfc's 1.86M
parameters on a 2-core CPU, its `stateless_uniform` bits only about 3 ms. So
`standard_normal` draws uniform Philox bits, one 32-bit word per output, and
maps pairs of them to pairs of independent normals with the Box-Muller
transform (Box & Muller, 1958):

    u1 = (b1 + 1/2) / 2^32 in (0, 1],  u2 = (b2 >> 8) / 2^24 in [0, 1)
    z1 = sqrt(-2 log u1) cos(2 pi u2),  z2 = sqrt(-2 log u1) sin(2 pi u2)

For exactly uniform u1, u2 the transform gives exactly independent N(0, 1)
pairs; here u1 lives on a grid of 2^32 points (so |z| <= 6.77, cutting off a
probability of 1.3e-11) and the angle on a grid of 2^24 points, finer than
float32 resolves. `noise_test` checks moments and a Kolmogorov-Smirnov test
on a large draw.

On CPUs an optional compiled kernel (`noise_kernel.cc`) draws the same
Philox words, bit for bit, and applies the same Box-Muller map in
vectorised loops, about 4x faster. Its log, cos and sin are its own
polynomials, so its normals agree with the TensorFlow ops' to float32
rounding (|difference| < 3e-6), not bit for bit: runs drawn with one and
with the other drift apart. `resolve(choice)` says which implementation a
run uses and why (training logs it and records it in config.json):
"off" TensorFlow's ops, "on" the kernel or a KernelUnavailableError, "auto"
the kernel when it loads, no GPU is visible, the strategy is not a TPU one
and the step is not compiled with XLA.

The library is compiled with -march=native for the machine that builds it;
beside it, `noise_kernel.so.cpu` lists that CPU's instruction-set
extensions, and a library built for extensions this CPU lacks (a venv or a
Bazel cache copied to another machine) is refused with the rebuild command
instead of being loaded.

The library is loaded from beside this module (`packaged_kernel_path`):
Bazel compiles it with the host's g++ (third_party/noise_kernel) and puts
it there in runfiles; pip and source-tree users build it there with
`python -m entropy_sgd.core.build_noise_kernel`. Precedence: the choice "off"
wins over everything; ENTROPY_SGD_NOISE_KERNEL=PATH loads PATH instead of
the packaged library; ENTROPY_SGD_NOISE_KERNEL=off makes no library
loadable ("auto" then uses TensorFlow's ops, "on" fails naming the
variable). `kernel_status()` says whether it is loaded and why not.

Keys: the noise of one SGLD step is keyed by (seed, stream, outer step t,
inner step l) and drawn in one piece for all parameters; parameter i gets
the slice at its offset in the concatenation of all parameters, in the
optimizer's order. So runs are reproducible, a resumed run draws the same
noise, and every replica draws the same noise without communication
(`stream` separates Parle's chains).
"""

import dataclasses
import math
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf
from tensorflow.python.ops import control_flow_util
from tensorflow.python.ops import gen_stateless_random_ops_v2

from entropy_sgd.core import build_noise_kernel

_TWO_PI = 2.0 * math.pi


def step_key(seed, step, inner_step, stream=0) -> tf.Tensor:
  """The Philox key [2] of the noise of SGLD step (t, l) of chain `stream`."""
  key = tf.stack([tf.constant(seed, tf.int64), tf.cast(stream, tf.int64)])
  for data in (step, inner_step):
    key = tf.random.experimental.stateless_fold_in(
        key, tf.cast(data, tf.int64), alg="philox")
  return key


def box_muller(bits: tf.Tensor, dtype=tf.float32) -> tf.Tensor:
  """Independent N(0, 1) values, one per uint32 in `bits` (even length).

  The first half of `bits` gives the radii and the second half the angles;
  the output holds the cosine parts, then the sine parts.
  """
  compute_dtype = tf.float64 if dtype == tf.float64 else tf.float32
  radius_bits, angle_bits = tf.split(bits, 2)
  u1 = (tf.cast(radius_bits, compute_dtype) + 0.5) * 2.0**-32
  u2 = tf.cast(tf.bitwise.right_shift(angle_bits, tf.constant(8, tf.uint32)),
               compute_dtype) * 2.0**-24
  radius = tf.sqrt(-2.0 * tf.math.log(tf.minimum(u1, 1.0)))
  angle = _TWO_PI * u2
  normals = tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], 0)
  return tf.cast(normals, dtype)


# Bits are drawn in chunks of this many words, chunk c keyed by
# fold_in(key, c): TensorFlow's Philox kernel runs on one thread, and
# independent chunks run on all cores at once. Fixed, so the values do not
# depend on the machine.
BITS_PER_CHUNK = 1 << 18


def random_bits(key: tf.Tensor, num_words: int) -> tf.Tensor:
  """`num_words` uniform uint32 words keyed by the Philox `key`."""
  chunks = []
  for index, start in enumerate(range(0, num_words, BITS_PER_CHUNK)):
    chunk_key = tf.random.experimental.stateless_fold_in(key, index,
                                                         alg="philox")
    chunks.append(tf.random.stateless_uniform(
        [min(BITS_PER_CHUNK, num_words - start)], seed=chunk_key,
        minval=None, maxval=None, dtype=tf.uint32, alg="philox"))
  return chunks[0] if len(chunks) == 1 else tf.concat(chunks, 0)


def chunk_keys_and_counters(key: tf.Tensor, num_words: int):
  """Philox (key, counter) of every chunk, as `random_bits` derives them."""
  keys, counters = [], []
  for index in range(-(-num_words // BITS_PER_CHUNK)):
    chunk_key = tf.random.experimental.stateless_fold_in(key, index,
                                                         alg="philox")
    philox_key, counter = (
        gen_stateless_random_ops_v2.stateless_random_get_key_counter(
            chunk_key))
    keys.append(philox_key)
    counters.append(counter)
  return tf.concat(keys, 0), tf.stack(counters)


# ----------------------------------------------------------------- Kernel.

KERNEL_FILE = "noise_kernel.so"  # Beside this module (build_noise_kernel).
BUILD_STATUS_FILE = "noise_kernel_status.txt"  # Bazel's build writes it.
PATH_VARIABLE = "ENTROPY_SGD_NOISE_KERNEL"  # =PATH: that library; =off.
BUILD_COMMAND = "python -m entropy_sgd.core.build_noise_kernel"

# The implementations, and the choices of `resolve` (--noise_kernel).
KERNEL, TENSORFLOW, NONE = "kernel", "tensorflow", "none"
CHOICES = ("auto", "on", "off")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_SPEED_NOTE = ("about 4x faster noise on CPUs; TensorFlow's ops draw the "
               "same distribution")


@dataclasses.dataclass(frozen=True)
class KernelStatus:
  """Whether the library at `path` loaded; if not, why and the fix."""
  path: str
  kernel: Any  # The op module, or None.
  # "loaded PATH", "off (...)", "not built: ...", "missing: ..." or "not
  # loadable: ...": it reads on after "the kernel is".
  status: str
  fix: str = ""  # How to get it, when it did not load.


_statuses: Dict[str, KernelStatus] = {}  # By path: each loads once.


def packaged_kernel_path() -> str:
  """Where the library belongs: beside this module (Bazel's runfiles put it
  there; `python -m entropy_sgd.core.build_noise_kernel` builds it there)."""
  return os.path.join(_PACKAGE_DIR, KERNEL_FILE)


def kernel_path() -> str:
  """The library to load: ENTROPY_SGD_NOISE_KERNEL=PATH if set (it wins),
  else the packaged one."""
  override = os.environ.get(PATH_VARIABLE, "")
  return override if override not in ("", "off") else packaged_kernel_path()


def kernel_build_status() -> Optional[str]:
  """What Bazel's build of the kernel said ("built", "not built: ..."),
  or None outside Bazel (no status file beside this module)."""
  path = os.path.join(_PACKAGE_DIR, BUILD_STATUS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as status:
    return status.read().strip()


def _build_fix() -> str:
  if kernel_build_status() is not None:  # Under Bazel.
    return ("install g++, then run `./bazelw sync --only=noise_kernel` "
            "(third_party/noise_kernel) and rerun")
  return f"build it with `{BUILD_COMMAND}` (needs g++)"


@tf.autograph.experimental.do_not_convert  # Plain Python.
def load_kernel() -> KernelStatus:
  """Loads the library of `kernel_path()` (once per path) and says how."""
  if os.environ.get(PATH_VARIABLE) == "off":
    return KernelStatus("", None, f"off ({PATH_VARIABLE}=off)",
                        f"unset {PATH_VARIABLE}")
  path = kernel_path()
  if path in _statuses:
    return _statuses[path]
  overridden = path != packaged_kernel_path()
  missing = build_noise_kernel.missing_cpu_flags(path)
  if os.path.exists(path) and missing:
    status = KernelStatus(
        path, None, f"not loadable: {path} was built (-march=native) for a "
        f"CPU with {', '.join(missing)}, which this CPU lacks",
        _build_fix() if not overridden else
        f"unset {PATH_VARIABLE} or rebuild that library on this machine")
  elif os.path.exists(path):
    try:
      status = KernelStatus(path, tf.load_op_library(path), f"loaded {path}")
    except (tf.errors.NotFoundError, OSError) as error:
      reason = " ".join(str(error).split())[:300]
      status = KernelStatus(path, None, f"not loadable: {path}: {reason}",
                            _build_fix() if not overridden else
                            f"unset {PATH_VARIABLE} or rebuild that library")
  elif overridden:
    status = KernelStatus(
        path, None, f"missing: {PATH_VARIABLE}={path} does not exist",
        f"unset {PATH_VARIABLE} or point it at a built library")
  else:
    built = kernel_build_status()
    status = KernelStatus(
        path, None, built if built and built != "built" else
        f"not built (no {KERNEL_FILE} beside {_PACKAGE_DIR}/noise.py)",
        _build_fix())
  _statuses[path] = status
  return status


@tf.autograph.experimental.do_not_convert  # Plain Python.
def _load_kernel():
  """The kernel's op module, or None."""
  return load_kernel().kernel


def kernel_status() -> str:
  """Whether the compiled noise kernel is loaded, and if not, why."""
  return load_kernel().status


@dataclasses.dataclass(frozen=True)
class Implementation:
  """Which implementation draws the float32 noise, and why."""
  name: str  # KERNEL, TENSORFLOW or NONE (nothing is drawn).
  reason: str

  @property
  def use_kernel(self) -> bool:
    return self.name == KERNEL


class KernelUnavailableError(RuntimeError):
  """The kernel was required but cannot run; the message says why and how
  to fix it (one line)."""


def _tpu_strategy(strategy) -> bool:
  tpu_strategies = tuple(
      getattr(module, "TPUStrategy") for module in
      (tf.distribute, tf.distribute.experimental)
      if hasattr(module, "TPUStrategy"))
  return isinstance(strategy, tpu_strategies)


@tf.autograph.experimental.do_not_convert  # Plain Python.
def resolve(choice: str = "auto", jit_compile: bool = False,
            strategy: Optional[tf.distribute.Strategy] = None
            ) -> Implementation:
  """The implementation of float32 noise under `choice`, on this machine.

  "off": TensorFlow's ops. "on": the kernel, or KernelUnavailableError
  saying why it cannot run (not loadable, an XLA-compiled step, a TPU
  strategy) and the fix. "auto": the kernel when it loads, no GPU is
  visible, `strategy` (default: the current one) is not a TPU strategy and
  the step is not compiled with XLA (`jit_compile`); else TensorFlow's ops.
  The library is `kernel_path()` (see the module docstring's precedence).
  """
  if choice not in CHOICES:
    raise ValueError(f"noise kernel choice {choice!r} is not one of "
                     f"{CHOICES}")
  if choice == "off":
    return Implementation(TENSORFLOW, "off: TensorFlow's ops requested")
  strategy = strategy or tf.distribute.get_strategy()
  cannot_run = ("the step is compiled with XLA, which cannot run it"
                if jit_compile else
                "TPUs cannot run it" if _tpu_strategy(strategy) else None)
  if choice == "on":
    if cannot_run:
      raise KernelUnavailableError(f"the compiled noise kernel cannot be "
                                   f"used here: {cannot_run}")
    loaded = load_kernel()
    if loaded.kernel is None:
      raise KernelUnavailableError(f"the compiled noise kernel is "
                                   f"{loaded.status}; {loaded.fix}")
    return Implementation(KERNEL, f"on: {loaded.status}")
  if cannot_run:
    return Implementation(TENSORFLOW, f"auto: {cannot_run}")
  if tf.config.list_logical_devices("GPU"):
    return Implementation(TENSORFLOW, "auto: a GPU is visible (the kernel "
                          "is for CPUs)")
  loaded = load_kernel()
  if loaded.kernel is None:
    return Implementation(TENSORFLOW, f"auto: the compiled kernel is "
                          f"{loaded.status}; {loaded.fix} for {_SPEED_NOTE}")
  return Implementation(KERNEL, f"auto: {loaded.status}, on a CPU")


@tf.autograph.experimental.do_not_convert  # Plain Python.
def _in_xla_function() -> bool:
  return control_flow_util.GraphOrParentsInXlaContext(
      tf.compat.v1.get_default_graph())


@tf.autograph.experimental.do_not_convert  # Plain Python.
def kernel_applies(dtype) -> bool:
  """`resolve("auto")`'s verdict for a draw of `dtype` traced here."""
  return (dtype == tf.float32 and not _in_xla_function() and
          resolve("auto").use_kernel)


def standard_normal(key: tf.Tensor, num_values: int, dtype=tf.float32,
                    use_kernel: Optional[bool] = None) -> tf.Tensor:
  """`num_values` independent N(0, 1) values keyed by the Philox `key`.

  `use_kernel`: None uses the compiled CPU kernel where it applies (see the
  module docstring), False never (e.g. inside an XLA-compiled function),
  True always (an error if it is not loaded).
  """
  num_pairs = (num_values + 1) // 2
  if use_kernel is None:
    use_kernel = kernel_applies(dtype)
  if use_kernel:
    kernel = _load_kernel()  # Not the global: AutoGraph copies globals.
    if kernel is None:
      raise RuntimeError(f"The noise kernel is {kernel_status()}.")
    keys, counters = chunk_keys_and_counters(key, 2 * num_pairs)
    normals = kernel.langevin_standard_normal(keys, counters,
                                              num_values=num_values)
    return tf.cast(normals, dtype)
  return box_muller(random_bits(key, 2 * num_pairs), dtype)[:num_values]


def philox_words(key: tf.Tensor, num_words: int) -> tf.Tensor:
  """The kernel's Philox words; equal to `random_bits(key, num_words)`."""
  kernel = _load_kernel()
  if kernel is None:
    raise RuntimeError(f"The noise kernel is {kernel_status()}.")
  keys, counters = chunk_keys_and_counters(key, num_words)
  return kernel.langevin_philox_words(keys, counters, num_words=num_words)


def langevin_noise(seed, step, inner_step, shapes: Sequence[tf.TensorShape],
                   dtype=tf.float32, stream=0,
                   use_kernel: Optional[bool] = None) -> List[tf.Tensor]:
  """N(0, I) noise of SGLD step (t, l), one tensor per shape in `shapes`."""
  sizes = [int(np.prod(shape)) for shape in shapes]
  flat = standard_normal(step_key(seed, step, inner_step, stream),
                         sum(sizes), dtype, use_kernel)
  return [tf.reshape(part, shape)
          for part, shape in zip(tf.split(flat, sizes), shapes)]
