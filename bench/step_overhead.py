"""Benchmark: does Entropy-SGD's inner loop cost more than L plain SGD steps?

Measures, in one process and interleaved, the time per gradient evaluation
of Nesterov SGD and of Entropy-SGD (outer-step time / L) on each `--model`
(the paper's mnistfc, lenet, allcnn or a Wide ResNet), with and without XLA,
on the same synthetic in-memory batch, and prints the ratio. Targets: <= 1.05
on mnistfc and lenet, <= 1.02 on wrn-16-1 (issue 18). Where the kernel has
the fused SGLD step, Entropy-SGD with the unfused step is timed beside it
(`--compare_fused`).

All four (optimizer, XLA) combinations of a model run interleaved in the same
rounds, so the XLA on/off ratio is measured side by side too.
`--loop_lengths=1,50` also measures Nesterov (without XLA) with that many
outer steps per compiled call (the launchers' --steps_per_loop),
interleaved, and prints images/s for each.

`--precision=mixed_bfloat16` (or mixed_float16) also runs both optimizers in
that precision, interleaved in the same rounds as float32, and prints
images/s of both precisions side by side, the speedup, and the
Entropy-SGD/Nesterov ratio in mixed precision (target <= 1.02 on wrn-16-1:
the float32 update must not show more once the gradient is cheaper).

    bazel run //bench:step_overhead -- --model=wrn-16-1 --batch_size=128
    bazel run //bench:step_overhead -- --model=mnistfc,lenet --jit=off
    bazel run //bench:step_overhead -- --model=mnistfc --jit=off \
        --loop_lengths=1,50
    bazel run //bench:step_overhead -- --model=mnistfc --jit=off \
        --compare_noise_kernel
    bazel run //bench:step_overhead -- --model=wrn-16-1 --jit=off \
        --precision=mixed_bfloat16
    bazel run //bench:step_overhead -- --model=mnistfc,wrn-16-1 --onednn=both
"""

from entropy_sgd.core import onednn  # First: before anything imports TensorFlow.

onednn.enable_before_tensorflow()

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
import tensorflow as tf

from bench import memory_traffic
from entropy_sgd.core import langevin as langevin_lib
from entropy_sgd.core import noise as noise_lib
from entropy_sgd.core import optimizers
from entropy_sgd.core import precision as precision_lib
from entropy_sgd.core import train_step as train_step_lib
from entropy_sgd.workloads import models

_MODELS = flags.DEFINE_list(
    "model", ["wrn-16-1"], "Models, comma-separated: mnistfc, lenet "
    "(MNIST-shaped input), allcnn or wrn-DEPTH-WIDTH (CIFAR-shaped input).")
_NOISE = flags.DEFINE_float("noise", 1e-4, "Entropy-SGD thermal noise eps "
                            "(0: no Langevin noise is drawn).")
_LOOP_LENGTHS = flags.DEFINE_list(
    "loop_lengths", [], "Also time Nesterov at these outer steps per "
    "compiled call, e.g. 1,50.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_L = flags.DEFINE_integer("L", 20, "Langevin steps of Entropy-SGD.")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 8, "Interleaved measurement rounds; the median is reported.")
_OUTER_STEPS = flags.DEFINE_integer(
    "outer_steps", 1, "Entropy-SGD outer steps per round (SGD runs the same "
    "number of gradient evaluations).")
_JIT = flags.DEFINE_enum("jit", "both", ["both", "on", "off"],
                         "Measure with XLA, without, or both.")
_COMPARE_NOISE_KERNEL = flags.DEFINE_bool(
    "compare_noise_kernel", False, "Also time Entropy-SGD (without XLA) "
    "with TensorFlow's ops for the noise instead of the compiled kernel.")
_COMPARE_FUSED = flags.DEFINE_bool(
    "compare_fused", True, "Also time Entropy-SGD (without XLA) with the "
    "unfused SGLD step (TensorFlow ops on the kernel's noise) beside the "
    "fused one, when the kernel has it.")
_MEMORY_MODEL = flags.DEFINE_bool(
    "memory_model", True, "Print each update's memory-traffic floor (bytes "
    "at one pass per tensor, over the measured bandwidth) beside its "
    "measured time alone.")
_COMPARE_SAM = flags.DEFINE_bool(
    "compare_sam", True, "Also time SAM (rho 0.05, Nesterov base): its cost "
    "per gradient evaluation against Nesterov's.")
_ONEDNN = flags.DEFINE_enum(
    "onednn", "as_launched", ["as_launched", "both"],
    "as_launched: oneDNN as this process runs it (the launchers' rule). "
    "both: Nesterov and Entropy-SGD (without XLA) in two child processes, "
    "one with TF_ENABLE_ONEDNN_OPTS=0 and one with =1, rounds interleaved; "
    "prints the on/off time ratio of each.")
_PRECISION = flags.DEFINE_enum(
    "precision", "float32", precision_lib.PRECISIONS,
    "Also measure in this mixed precision, beside float32.")


def make_runner(model_name, optimizer_name, jit_compile, loop_length=1,
                precision="float32", noise_kernel=None, fused=None):
  """A function timing one round; returns seconds per gradient evaluation."""
  shape = (models.MNIST_SHAPE if "mnist" in models.spec(model_name).datasets
           else models.CIFAR_SHAPE)
  strategy = tf.distribute.get_strategy()
  model = train_step_lib.build_model(
      strategy, lambda: models.build(
          model_name, 10,
          compute_dtype=precision_lib.compute_dtype(precision)), shape)
  loss_scale = (precision_lib.DynamicLossScale()
                if precision_lib.uses_loss_scaling(precision) else None)
  if optimizer_name == "entropy_sgd":
    optimizer = optimizers.EntropySGD(
        learning_rate=1.0, num_langevin_steps=_L.value, weight_decay=5e-4,
        noise=_NOISE.value, conventions="lua_reference",
        jit_compile=jit_compile)
    if noise_kernel is False:
      optimizer.use_noise_kernel = False
    if fused is False:
      optimizer.fused_update = False
  elif optimizer_name == "sam":
    optimizer = optimizers.SAM(0.1, rho=0.05, momentum=0.9, nesterov=True,
                               weight_decay=5e-4, jit_compile=jit_compile)
  else:
    optimizer = optimizers.SGD(0.1, momentum=0.9, nesterov=True,
                               weight_decay=5e-4, jit_compile=jit_compile)
  images = tf.random.stateless_normal([_BATCH_SIZE.value, *shape], [1, 2])
  labels = tf.random.stateless_uniform([_BATCH_SIZE.value], [3, 4],
                                       maxval=10, dtype=tf.int32)
  dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
  iterator = iter(dataset)
  step = train_step_lib.make_train_step(
      model, optimizer, strategy, _BATCH_SIZE.value, jit_compile=jit_compile,
      loss_scale=loss_scale)
  evaluations_per_call = optimizer.gradient_evaluations_per_step * loop_length
  calls = max(1, _OUTER_STEPS.value * _L.value // evaluations_per_call)

  def seconds_per_evaluation():
    start = time.perf_counter()
    for _ in range(calls):
      metrics = step(iterator, loop_length)
    float(metrics["loss"])  # Waits for the last step.
    return (time.perf_counter() - start) / (calls * evaluations_per_call)

  seconds_per_evaluation()  # Trace, compile and warm up.
  return seconds_per_evaluation


def measure(runners, label):
  """Interleaved rounds; returns {name: median seconds}, printing each."""
  times = {name: [] for name in runners}
  for round_index in range(_ROUNDS.value):
    for name, runner in runners.items():
      times[name].append(runner())
    print(f"  {label} round {round_index + 1}/{_ROUNDS.value}: "
          + ", ".join(f"{n} {t[-1] * 1e3:.1f} ms" for n, t in times.items()),
          flush=True)
  return ({name: statistics.median(t) for name, t in times.items()},
          {name: min(t) for name, t in times.items()})


def compare_optimizers(model_name, jit_modes, mixed=None):
  """Both optimizers in every XLA mode (and in float32 and the `mixed`
  precision), all interleaved in the same rounds."""
  runners = {f"{name}/xla={jit}": make_runner(model_name, name, jit)
             for jit in jit_modes for name in ("nesterov", "entropy_sgd")}
  if mixed:
    runners.update({
        f"{name}/xla={jit}/{mixed}": make_runner(model_name, name, jit,
                                                 precision=mixed)
        for jit in jit_modes for name in ("nesterov", "entropy_sgd")})
  if _COMPARE_SAM.value:
    runners.update({f"sam/xla={jit}": make_runner(model_name, "sam", jit)
                    for jit in jit_modes})
  compare_kernel = (_COMPARE_NOISE_KERNEL.value and False in jit_modes and
                    noise_lib.kernel_status().startswith("loaded"))
  if compare_kernel:
    runners["entropy_sgd_tf_noise/xla=False"] = make_runner(
        model_name, "entropy_sgd", False, noise_kernel=False)
  compare_fused = (_COMPARE_FUSED.value and False in jit_modes and
                   langevin_lib.fused_op() is not None)
  if compare_fused:
    runners["entropy_sgd_unfused/xla=False"] = make_runner(
        model_name, "entropy_sgd", False, fused=False)
  median, fastest = measure(runners, model_name)
  target = 1.02 if model_name.startswith("wrn") else 1.05
  for jit in jit_modes:
    nesterov, esgd = f"nesterov/xla={jit}", f"entropy_sgd/xla={jit}"
    ratio = median[esgd] / median[nesterov]
    prefix = f"{model_name} xla={str(jit):5s}"
    print(f"{prefix}  fastest rounds: nesterov {fastest[nesterov] * 1e3:.1f} "
          f"ms, entropy_sgd {fastest[esgd] * 1e3:.1f} ms; ratio "
          f"{fastest[esgd] / fastest[nesterov]:.3f}")
    print(f"{prefix}  per gradient evaluation: "
          f"nesterov {median[nesterov] * 1e3:7.1f} ms "
          f"({_BATCH_SIZE.value / median[nesterov]:6.1f} images/s), "
          f"entropy_sgd {median[esgd] * 1e3:7.1f} ms "
          f"({_BATCH_SIZE.value / median[esgd]:6.1f} images/s); "
          f"median ratio entropy_sgd/nesterov = {ratio:.3f} "
          f"({'meets' if ratio <= target else 'misses'} the {target} target)",
          flush=True)
  for jit in jit_modes if _COMPARE_SAM.value else ():
    nesterov, sam = f"nesterov/xla={jit}", f"sam/xla={jit}"
    print(f"{model_name} xla={str(jit):5s}  per gradient evaluation: sam "
          f"{median[sam] * 1e3:7.1f} ms (2 per step); median ratio "
          f"sam/nesterov = {median[sam] / median[nesterov]:.3f}; per step "
          f"{2 * median[sam] / median[nesterov]:.3f}", flush=True)
  if compare_kernel:
    print_variant(model_name, median, "entropy_sgd_tf_noise",
                  "with TensorFlow-op noise", "the kernel saves")
  if compare_fused:
    print_variant(model_name, median, "entropy_sgd_unfused",
                  "with the unfused SGLD step", "fusing saves")
  for jit in jit_modes if mixed else ():
    print_mixed_precision(model_name, jit, mixed, median, target)
  if len(jit_modes) == 2:
    print(f"{model_name} XLA on/off time per gradient evaluation: nesterov "
          f"{median['nesterov/xla=True'] / median['nesterov/xla=False']:.3f},"
          f" entropy_sgd {median['entropy_sgd/xla=True'] / median['entropy_sgd/xla=False']:.3f}",
          flush=True)


def print_variant(model_name, median, name, description, saving):
  """One line: an Entropy-SGD variant (without XLA) beside Nesterov and the
  default Entropy-SGD."""
  variant, nesterov = f"{name}/xla=False", "nesterov/xla=False"
  print(f"{model_name} xla=False  entropy_sgd {description} "
        f"{median[variant] * 1e3:7.1f} ms; ratio to nesterov "
        f"{median[variant] / median[nesterov]:.3f}; {saving} "
        f"{(median[variant] - median['entropy_sgd/xla=False']) * 1e3:.1f}"
        f" ms per gradient evaluation", flush=True)


def print_mixed_precision(model_name, jit, mixed, median, target):
  """images/s of float32 and `mixed` side by side; the ratio in `mixed`."""
  batch = _BATCH_SIZE.value
  prefix = f"{model_name} xla={str(jit):5s}"
  speeds = []
  for name in ("nesterov", "entropy_sgd"):
    full = median[f"{name}/xla={jit}"]
    half = median[f"{name}/xla={jit}/{mixed}"]
    speeds.append(f"{name} {batch / full:7.1f} -> {batch / half:7.1f} "
                  f"images/s ({full / half:.2f}x)")
  print(f"{prefix}  float32 -> {mixed}: " + ", ".join(speeds), flush=True)
  nesterov = median[f"nesterov/xla={jit}/{mixed}"]
  esgd = median[f"entropy_sgd/xla={jit}/{mixed}"]
  ratio = esgd / nesterov
  print(f"{prefix}  {mixed} per gradient evaluation: nesterov "
        f"{nesterov * 1e3:7.1f} ms, entropy_sgd {esgd * 1e3:7.1f} ms; "
        f"{mixed} median ratio entropy_sgd/nesterov = {ratio:.3f} "
        f"({'meets' if ratio <= target else 'misses'} the {target} target)",
        flush=True)


def compare_loop_lengths(model_name, jit_compile):
  lengths = [int(n) for n in _LOOP_LENGTHS.value]
  runners = {f"N={n}": make_runner(model_name, "nesterov", jit_compile, n)
             for n in lengths}
  median, _ = measure(runners, f"{model_name} nesterov steps_per_loop")
  base = median[f"N={lengths[0]}"]
  print(f"{model_name} xla={jit_compile} nesterov images/s by "
        f"--steps_per_loop: " + ", ".join(
            f"{name}: {_BATCH_SIZE.value / t:.0f} ({base / t:.2f}x)"
            for name, t in median.items()), flush=True)


def print_memory_model(model_name, bandwidth):
  """The update's memory-traffic floor beside its measured time, per
  optimizer (see memory_traffic.py)."""
  shape = (models.MNIST_SHAPE if "mnist" in models.spec(model_name).datasets
           else models.CIFAR_SHAPE)
  variants = [("nesterov", None), ("entropy_sgd", None)]
  if langevin_lib.fused_op() is not None:
    variants.append(("entropy_sgd unfused", False))
  for name, fused in variants:
    model = train_step_lib.build_model(
        tf.distribute.get_strategy(), lambda: models.build(model_name, 10),
        shape)
    if name.startswith("entropy_sgd"):
      optimizer = optimizers.EntropySGD(
          learning_rate=1.0, num_langevin_steps=_L.value, weight_decay=5e-4,
          noise=_NOISE.value, conventions="lua_reference")
      if fused is False:
        optimizer.fused_update = False
    else:
      optimizer = optimizers.SGD(0.1, momentum=0.9, nesterov=True,
                                 weight_decay=5e-4)
    for line in memory_traffic.floor_report(
        name, optimizer, list(model.trainable_variables),
        bandwidth).split("\n"):
      print(f"{model_name} memory model, {line}", flush=True)


_CHILD = "STEP_OVERHEAD_ONEDNN_CHILD"  # Set in the children of --onednn=both.


def serve_rounds(model_name):
  """Child of --onednn=both: times one round per line "round" on stdin and
  answers with one JSON line of seconds per gradient evaluation."""
  runners = {name: make_runner(model_name, name, False)
             for name in ("nesterov", "entropy_sgd")}
  print("ready", flush=True)
  for line in sys.stdin:
    if line.strip() != "round":
      break
    print(json.dumps({name: runner() for name, runner in runners.items()}),
          flush=True)


def compare_onednn(model_name):
  """Both optimizers with oneDNN off and on, in two processes, interleaved."""
  children = {}
  for setting in ("0", "1"):
    arguments = [a for a in sys.argv[1:] if not a.startswith(
        ("--onednn", "--model"))]
    children[setting] = subprocess.Popen(
        [sys.executable, sys.argv[0], f"--model={model_name}", *arguments],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, onednn.ENV: setting, _CHILD: "1"})
  for setting, child in children.items():
    if child.stdout.readline().strip() != "ready":
      raise SystemExit(f"error: the oneDNN={setting} child of "
                       f"--onednn=both failed; rerun it alone with "
                       f"TF_ENABLE_ONEDNN_OPTS={setting} to see why")
  times = {(s, n): [] for s in children for n in ("nesterov", "entropy_sgd")}
  for round_index in range(_ROUNDS.value):
    for setting, child in children.items():
      child.stdin.write("round\n")
      child.stdin.flush()
      for name, seconds in json.loads(child.stdout.readline()).items():
        times[(setting, name)].append(seconds)
    print(f"  {model_name} oneDNN round {round_index + 1}/{_ROUNDS.value}: "
          + ", ".join(f"{n} oneDNN={s} {t[-1] * 1e3:.1f} ms"
                      for (s, n), t in times.items()), flush=True)
  for child in children.values():
    child.stdin.close()
    child.wait()
  median = {key: statistics.median(t) for key, t in times.items()}
  for name in ("nesterov", "entropy_sgd"):
    off, on = median[("0", name)], median[("1", name)]
    print(f"{model_name} xla=False  {name} per gradient evaluation: oneDNN "
          f"off {off * 1e3:.1f} ms, on {on * 1e3:.1f} ms; median ratio "
          f"off/on = {off / on:.3f}", flush=True)
  for setting in children:
    print(f"{model_name} xla=False  oneDNN={setting}: median ratio "
          f"entropy_sgd/nesterov = "
          f"{median[(setting, 'entropy_sgd')] / median[(setting, 'nesterov')]:.3f}",
          flush=True)


def main(argv):
  del argv
  if os.environ.get(_CHILD):
    serve_rounds(_MODELS.value[0])
    return
  if _ONEDNN.value == "both":
    print(f"models {','.join(_MODELS.value)}, batch {_BATCH_SIZE.value}, "
          f"L={_L.value}, {_ROUNDS.value} rounds, oneDNN off and on in two "
          f"processes, interleaved; noise kernel {noise_lib.kernel_status()}")
    for model_name in _MODELS.value:
      compare_onednn(model_name)
    return
  jit_modes = {"both": [False, True], "on": [True], "off": [False]}
  print(f"models {','.join(_MODELS.value)}, batch {_BATCH_SIZE.value}, "
        f"L={_L.value}, noise={_NOISE.value}, {_ROUNDS.value} rounds x "
        f"{_OUTER_STEPS.value * _L.value} gradient evaluations per "
        f"optimizer; precision float32"
        f"{'' if _PRECISION.value == 'float32' else ' and ' + _PRECISION.value}"
        f"; TF {tf.__version__}, "
        f"{len(tf.config.list_physical_devices())} device(s); noise kernel "
        f"{noise_lib.kernel_status()}; oneDNN "
        f"{'on' if onednn.is_on() else 'off'} ({onednn.launcher_message()})")
  bandwidth = None
  if _MEMORY_MODEL.value:
    bandwidth = memory_traffic.stream_bandwidth()
    print(f"memory bandwidth (STREAM-like scale, 2 x 256 MB, this process): "
          f"{bandwidth / 1e9:.1f} GB/s", flush=True)
  for model_name in _MODELS.value:
    if bandwidth:
      print_memory_model(model_name, bandwidth)
    mixed = None if _PRECISION.value == "float32" else _PRECISION.value
    compare_optimizers(model_name, jit_modes[_JIT.value], mixed)
    if _LOOP_LENGTHS.value:
      compare_loop_lengths(model_name, False)


if __name__ == "__main__":
  app.run(main)
