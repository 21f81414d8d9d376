"""The Langevin noise draw: the compiled kernel against TensorFlow's ops.

    bazel run //bench:noise_draw [-- --values=1863690 --rounds=7 --calls=50]

Times, interleaved in the same rounds, each stage of drawing `--values`
N(0, 1) values (default: the weights of mnistfc's 784-1024-1024-10 MLP):

* `words`: the Philox4x32-10 words, TensorFlow's `stateless_uniform`
  (`noise.random_bits`) and the kernel's (`noise.philox_words`);
* `normals`: Box-Muller on them (`noise.standard_normal`), both ways;
* `fused step`: the kernel's fused SGLD step (`langevin.langevin_update`)
  on tensors of the MLP's shapes, with and without noise; the difference is
  what the noise adds to a step, the cost the Keras and Sonnet optimizers
  pay on a CPU.

Prints ns per value (median over rounds, on all of TensorFlow's CPU threads)
and the ratios kernel/TensorFlow, side by side.
"""

from entropy_sgd.core import onednn  # First: before anything imports TensorFlow.

onednn.enable_before_tensorflow()

import time  # pylint: disable=g-import-not-at-top

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from entropy_sgd.core import algorithm
from entropy_sgd.core import langevin
from entropy_sgd.core import noise as noise_lib

_VALUES = flags.DEFINE_integer("values", 1863690, "Values per draw (mnistfc's "
                               "784-1024-1024-10 MLP has 1,863,690 weights).")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Interleaved timing rounds.")
_CALLS = flags.DEFINE_integer("calls", 50, "Calls per contender and round.")

MLP_SHAPES = ((784, 1024), (1024,), (1024, 1024), (1024,), (1024, 10), (10,))


def fused_step(num_values: int, noise: float):
  """A compiled fused SGLD step on float32 tensors of `num_values` in all
  (the MLP's shapes when the sizes agree, else one vector)."""
  shapes = (MLP_SHAPES if sum(np.prod(s) for s in MLP_SHAPES) == num_values
            else ((num_values,),))
  rng = np.random.RandomState(0)
  state = [[tf.Variable(rng.normal(size=s).astype(np.float32)) for s in shapes]
           for _ in range(4)]  # x', x, mu, g
  hp = algorithm.Hyperparameters(noise=noise)

  @tf.function
  def step(t):
    samples, anchors, means, gradients = (
        [v.read_value() for v in part] for part in state)
    new_samples, new_means, _ = langevin.langevin_update(
        hp, samples, anchors, means, gradients, [], step=t, inner_step=t % 20,
        langevin_learning_rate=0.1, use_kernel=True, fused=True)
    for variables, values in ((state[0], new_samples), (state[2], new_means)):
      for variable, value in zip(variables, values):
        variable.assign(value)
  return step


def contenders(num_values: int):
  def draw(function):
    @tf.function
    def call(t):
      return function(noise_lib.step_key(0, t, t % 20))
    return call
  num_words = 2 * ((num_values + 1) // 2)
  return {
      "tensorflow words": draw(lambda k: noise_lib.random_bits(k, num_words)),
      "kernel words": draw(lambda k: noise_lib.philox_words(k, num_words)),
      "tensorflow normals": draw(lambda k: noise_lib.standard_normal(
          k, num_values, use_kernel=False)),
      "kernel normals": draw(lambda k: noise_lib.standard_normal(
          k, num_values, use_kernel=True)),
      "fused step, no noise": fused_step(num_values, 0.0),
      "fused step, noise": fused_step(num_values, 1e-4),
  }


def main(argv):
  del argv
  loaded = noise_lib.load_kernel()
  if loaded.kernel is None or langevin.fused_op() is None:
    raise app.UsageError(f"the noise kernel is {loaded.status}: build it "
                         f"({noise_lib.BUILD_COMMAND}) to benchmark it")
  n = _VALUES.value
  print(f"oneDNN {'on' if onednn.is_on() else 'off'}; noise "
        f"{noise_lib.kernel_status()}; {n:,} values, {_CALLS.value} calls x "
        f"{_ROUNDS.value} rounds; TensorFlow's CPU threads: intra-op "
        f"{tf.config.threading.get_intra_op_parallelism_threads() or 'all'}")
  functions = contenders(n)
  for function in functions.values():  # Trace and warm up.
    function(tf.constant(1, tf.int64))
  seconds = {name: [] for name in functions}
  for _ in range(_ROUNDS.value):
    for name, function in functions.items():
      start = time.perf_counter()
      for call in range(_CALLS.value):
        result = function(tf.constant(call, tf.int64))
      if result is not None:
        result.numpy()  # Wait for the last call.
      seconds[name].append((time.perf_counter() - start) / _CALLS.value)
  ns = {name: 1e9 * np.median(s) / n for name, s in seconds.items()}
  for name, value in ns.items():
    print(f"{name}: {value:.3f} ns per value ({1e3 * value * n / 1e9:.3f} ms "
          f"per draw)")
  for stage in ("words", "normals"):
    print(f"{stage}: median ratio kernel/tensorflow = "
          f"{ns[f'kernel {stage}'] / ns[f'tensorflow {stage}']:.3f}")
  added = ns["fused step, noise"] - ns["fused step, no noise"]
  print(f"fused step: the noise adds {added:.3f} ns per value "
        f"({added * n / 1e6:.3f} ms per step), "
        f"ratio noise/no noise = "
        f"{ns['fused step, noise'] / ns['fused step, no noise']:.3f}")


if __name__ == "__main__":
  app.run(main)
