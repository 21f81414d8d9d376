"""The package's layers, lowest first (as `entropy_sgd.LAYERS`, which
//entropy_sgd:layers_test holds equal to this list).

    load("//entropy_sgd:layers.bzl", "layer_files", "visible_above")
    package(default_visibility = visible_above("analysis"))
    layer_files()
"""

LAYERS = ["core", "workloads", "analysis", "train", "reports", "cli"]

# Outside the package: may use every layer.
_OUTSIDE = ["//bench:__pkg__", "//examples:__pkg__", "//launch:__pkg__", "//tools:__pkg__"]

def visible_above(layer):
    """The visibility of a layer's targets: the layers above it and the
    directories outside the package, so that a lower layer's dependency on
    it fails to build."""
    above = LAYERS[LAYERS.index(layer) + 1:]
    return ["//entropy_sgd/%s:__pkg__" % name for name in above] + _OUTSIDE

def layer_files():
    """The layer's sources and BUILD, read by //entropy_sgd:layers_test."""
    native.filegroup(
        name = "layer_files",
        srcs = native.glob(["*.py"]) + ["BUILD"],
        visibility = ["//entropy_sgd:__pkg__"],
    )
