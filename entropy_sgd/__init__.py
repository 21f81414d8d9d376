"""Entropy-SGD (Chaudhari et al., ICLR 2017) for TensorFlow 2, Sonnet 2 and
Keras 3.

The package has layers; a module imports only from its own layer and those
before it in `LAYERS` (checked by //entropy_sgd:layers_test and by the
visibility in each layer's BUILD):

    core       Algorithm 1 (algorithm.py), the Langevin noise, the Sonnet
               optimizers, the compiled train step, the Keras optimizer
    workloads  the models and the input pipelines
    analysis   Hessian-vector products and flatness measures
    train      configuration and presets, run directories, the training loop
    reports    tools that read run directories (landscape, results, plots)
    cli        the launchers' flags and entry point

The public API is the modules in `PUBLIC`, importable from here:

    from entropy_sgd import optimizers, keras_plugin

They load on first use, so `import entropy_sgd` imports no TensorFlow (the
launchers set oneDNN up before TensorFlow starts).
"""

import importlib

LAYERS = ("core", "workloads", "analysis", "train", "reports", "cli")

# module name -> its layer: what `from entropy_sgd import NAME` gives.
PUBLIC = {
    "algorithm": "core",
    "optimizers": "core",
    "train_step": "core",
    "keras_plugin": "core",
    "noise": "core",
    "precision": "core",
    "distribution": "core",
    "models": "workloads",
    "data": "workloads",
    "hessian": "analysis",
    "config": "train",
    "training": "train",
}

__all__ = sorted(PUBLIC)


def __getattr__(name):
  if name in PUBLIC:
    module = importlib.import_module(f"{__name__}.{PUBLIC[name]}.{name}")
    globals()[name] = module
    return module
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(PUBLIC))
