"""Compiles the optional CPU noise kernel into the package.

    python -m entropy_sgd.core.build_noise_kernel            # pip or source tree
    python -m entropy_sgd.core.build_noise_kernel --output=PATH

compiles `noise_kernel.cc` (beside this module) with g++ and TensorFlow's
own compile and link flags (`tf.sysconfig`) into `noise_kernel.so` beside
`noise.py`, where `noise.py` loads it, and checks that it loads. Bazel's
repository rule (third_party/noise_kernel) runs this same module, so both
builds share one command. Needs g++; takes about 30 s. Without the kernel
the TensorFlow ops draw the same distribution, about 4x slower on CPUs.

Exits 0 after "built PATH", or 1 with one `error:` line.
"""

import argparse
import os
import shutil
import subprocess
import sys
from typing import List, Optional

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(_HERE, "noise_kernel.cc")
# Where `noise.py` looks (noise.KERNEL_FILE; not imported: it needs no TF).
OUTPUT = os.path.join(_HERE, "noise_kernel.so")

# -march=native: built on the machine that runs it. No -ffast-math: the
# arithmetic stays IEEE; only errno and trapping are dropped, so the loops
# vectorise. -U__AVX512FP16__: TensorFlow's bundled Eigen does not compile
# its half-precision AVX512 code with g++ (CPUs with AVX512-FP16, e.g.
# Sapphire Rapids); the kernel computes in float32 and needs none of it.
COMPILER_FLAGS = ("-shared", "-fPIC", "-O3", "-march=native",
                  "-U__AVX512FP16__", "-fopenmp-simd", "-fno-math-errno",
                  "-fno-trapping-math", "-w")


# Beside the library: the instruction-set flags of the CPU it was built for
# (-march=native), so that `noise.load_kernel` refuses it on a CPU that
# lacks any of them (a copied venv or Bazel cache) instead of crashing.
CPU_SUFFIX = ".cpu"
# /proc/cpuinfo flags that name instruction-set extensions.
ISA_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "bmi", "adx", "popcnt",
                "movbe", "abm", "sha", "aes", "pclmul", "vaes", "vpclmul",
                "gfni", "amx", "rdrand", "rdseed", "xsave", "lzcnt")


def isa_flags(flags) -> List[str]:
  """The instruction-set extensions among CPU `flags`, sorted."""
  return sorted(f for f in flags if f.startswith(ISA_PREFIXES))


def write_cpu_file(output: str, flags=None) -> None:
  from entropy_sgd.core import onednn  # pylint: disable=g-import-not-at-top
  flags = onednn.cpu_flags() if flags is None else flags
  with open(output + CPU_SUFFIX, "w") as f:
    f.write(" ".join(isa_flags(flags)) + "\n")


def missing_cpu_flags(library: str, flags=None) -> List[str]:
  """Extensions the library was built for that this CPU lacks ([] if none
  or if unknown)."""
  from entropy_sgd.core import onednn  # pylint: disable=g-import-not-at-top
  try:
    with open(library + CPU_SUFFIX) as f:
      built_for = f.read().split()
  except OSError:
    return []
  flags = onednn.cpu_flags() if flags is None else flags
  if not flags:  # Not Linux: nothing to compare.
    return []
  return sorted(set(built_for) - set(flags))


class BuildError(RuntimeError):
  """The kernel could not be built; the message says why (one line)."""


def tensorflow_flags() -> List[str]:
  """TensorFlow's compile and link flags for a custom op library."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.sysconfig.get_compile_flags() + tf.sysconfig.get_link_flags()


def compile_command(compiler: str, source: str, output: str,
                    flags: List[str]) -> List[str]:
  return [compiler, *COMPILER_FLAGS, source, "-o", output, *flags]


def build(output: str = OUTPUT, source: str = SOURCE,
          compiler: Optional[str] = None) -> str:
  """Compiles the kernel to `output` and loads it once; returns `output`."""
  compiler = compiler or shutil.which("g++")
  if not compiler:
    raise BuildError("no g++ on PATH; install it (e.g. apt-get install g++)")
  if not os.path.exists(source):
    raise BuildError(f"{source} is missing (an incomplete install?)")
  if not os.access(os.path.dirname(output), os.W_OK):
    raise BuildError(f"cannot write {output}; pass --output=PATH and set "
                     f"ENTROPY_SGD_NOISE_KERNEL=PATH")
  command = compile_command(compiler, source, output, tensorflow_flags())
  try:
    result = subprocess.run(command, capture_output=True, text=True,
                            timeout=600, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise BuildError(f"g++ did not run: {e}") from None
  if result.returncode != 0:
    tail = " ".join(result.stderr.split())[-1500:]
    raise BuildError(f"g++ failed: {tail}")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.load_op_library(output)
  except (tf.errors.NotFoundError, OSError) as e:
    os.remove(output)
    raise BuildError(f"the library was built but does not load: "
                     f"{' '.join(str(e).split())[:500]}") from None
  write_cpu_file(output)
  return output


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m entropy_sgd.core.build_noise_kernel",
      description=__doc__.split("\n\n")[0])
  parser.add_argument("--output", default=OUTPUT,
                      help="Library to write (default: beside noise.py, "
                      "where it is loaded from; elsewhere, point "
                      "ENTROPY_SGD_NOISE_KERNEL at it).")
  parser.add_argument("--source", default=SOURCE, help=argparse.SUPPRESS)
  parser.add_argument("--compiler", default=None,
                      help="C++ compiler (default: g++ on PATH).")
  args = parser.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  try:
    output = build(os.path.abspath(args.output), args.source, args.compiler)
  except BuildError as e:
    print(f"error: noise kernel not built: {e}", file=sys.stderr)
    return 1
  print(f"built {output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
