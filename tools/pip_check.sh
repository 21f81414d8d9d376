#!/usr/bin/env bash
# pip_check.sh: builds the entropy_sgd wheel from pyproject.toml and checks
# that it installs and works in a fresh virtualenv, without Bazel:
#   1. `pip wheel --no-deps --no-build-isolation` on a copy of the sources
#      (setuptools from .venv: no download; no build/ or *.egg-info left in
#      the checkout);
#   2. a new venv (no pip of its own) that sees .venv's site-packages through
#      a .pth file, so the dependencies are there without installing them;
#      the wheel goes in with `--no-deps --no-index`;
#   3. the wheel's declared dependency ranges must accept the packages found
#      (the pins of requirements.txt), `import entropy_sgd...` must load the
#      installed copy, the wheel must carry noise_kernel.cc, and
#      examples/keras_cifar10.py runs two Entropy-SGD steps on testdata/
#      (skip with PIP_CHECK_SMOKE=0);
#   4. with PIP_CHECK_KERNEL=1 (g++, ~30 s more): `python -m
#      entropy_sgd.core.build_noise_kernel` builds the noise kernel into the
#      installed package and `--noise_kernel=on` resolves to it.
# Usage: tools/pip_check.sh [PYTHON]  (default .venv/bin/python3; run ./bazelw
# once first). Prints "pip_check: ok" and exits 0, or says what failed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${1:-$root/.venv/bin/python3}"
say() { echo "pip_check: $*" >&2; }

if [[ ! -x "$python" ]]; then
  say "no interpreter at $python; run ./bazelw once to create .venv"
  exit 1
fi

work="$(mktemp -d -t pip-check.XXXXXX)"
trap 'rm -rf "$work"' EXIT

# 1. The wheel, built from a copy of what it packages.
mkdir "$work/src"
cp "$root/pyproject.toml" "$root/README.md" "$work/src/"
cp -r "$root/entropy_sgd" "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
say "building the wheel ..."
"$python" -m pip wheel --quiet --disable-pip-version-check --no-deps \
  --no-build-isolation --wheel-dir "$work/dist" "$work/src" >&2
wheel=("$work"/dist/entropy_sgd-*.whl)
[[ -f "${wheel[0]}" ]] || { say "no wheel was built"; exit 1; }

# 2. A fresh venv that reuses the packages of $python's environment.
"$python" -m venv --without-pip "$work/venv"
venv_python="$work/venv/bin/python"
purelib() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
purelib "$python" > "$(purelib "$venv_python")/_parent_site_packages.pth"
say "installing $(basename "${wheel[0]}") into a fresh venv ..."
"$venv_python" -m pip install --quiet --disable-pip-version-check --no-deps \
  --no-index "${wheel[0]}" >&2

# 3. Dependencies, imports, and the Keras example, away from the checkout.
cd "$work"
TF_CPP_MIN_LOG_LEVEL=2 "$venv_python" - <<'EOF'
import importlib.metadata
import os
import sys

from packaging.requirements import Requirement

problems = []
for line in importlib.metadata.requires("entropy-sgd") or []:
  requirement = Requirement(line)
  if requirement.marker and not requirement.marker.evaluate():
    continue
  try:
    version = importlib.metadata.version(requirement.name)
  except importlib.metadata.PackageNotFoundError:
    problems.append(f"{requirement} is not installed")
    continue
  if not requirement.specifier.contains(version, prereleases=True):
    problems.append(f"{requirement.name} {version} is outside {requirement}")
if problems:
  sys.exit("pip_check: declared dependencies do not match the environment: "
           + "; ".join(problems))

import entropy_sgd  # pylint: disable=g-import-not-at-top
location = os.path.realpath(os.path.dirname(entropy_sgd.__file__))
if not location.startswith(os.path.realpath(sys.prefix) + os.sep):
  sys.exit(f"pip_check: imported entropy_sgd from {location}, not from the "
           f"fresh venv {sys.prefix}")
from entropy_sgd.core import keras_plugin, optimizers, train_step  # pylint: disable=g-import-not-at-top,unused-import
from entropy_sgd.train import training  # pylint: disable=g-import-not-at-top,unused-import
from entropy_sgd.workloads import data  # pylint: disable=g-import-not-at-top,unused-import
optimizers.EntropySGD(conventions="pytorch_reference")
print(f"pip_check: entropy_sgd imports from {location}", file=sys.stderr)
from entropy_sgd.core import build_noise_kernel, noise  # pylint: disable=g-import-not-at-top
if not os.path.exists(build_noise_kernel.SOURCE):
  sys.exit(f"pip_check: the wheel lacks {build_noise_kernel.SOURCE}, which "
           f"`{noise.BUILD_COMMAND}` compiles")
print(f"pip_check: noise: {noise.resolve('auto').reason}", file=sys.stderr)
EOF

if [[ "${PIP_CHECK_KERNEL:-0}" != 0 ]]; then
  say "building the noise kernel into the installed package ..."
  env -u ENTROPY_SGD_NOISE_KERNEL -u PYTHONPATH TF_CPP_MIN_LOG_LEVEL=2 "$venv_python" \
    -m entropy_sgd.core.build_noise_kernel >&2
  env -u ENTROPY_SGD_NOISE_KERNEL -u PYTHONPATH TF_CPP_MIN_LOG_LEVEL=2 "$venv_python" -c \
    'from entropy_sgd.core import noise; print("pip_check: noise:", noise.resolve("on").reason)' >&2
fi

if [[ "${PIP_CHECK_SMOKE:-1}" != 0 ]]; then
  say "examples/keras_cifar10.py, 2 steps on testdata/cifar10 ..."
  log="$work/example.log"
  if ! env -u PYTHONPATH -u BUILD_WORKING_DIRECTORY TF_CPP_MIN_LOG_LEVEL=2 \
      "$venv_python" "$root/examples/keras_cifar10.py" \
      --data_dir="$root/testdata/cifar10" --batch_size=16 --L=2 --epochs=1 \
      --max_steps=2 >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    say "the Keras example failed with the installed wheel"
    exit 1
  fi
  for key in gamma anchor_to_mean_distance val_accuracy; do
    grep -q "$key" "$log" || { tail -n 30 "$log" >&2; say "no $key in the example's logs"; exit 1; }
  done
fi
echo "pip_check: ok"
