"""Compiles entropy_sgd/noise_kernel.cc against the venv's TensorFlow.

The kernel is an optional speed-up of the Langevin noise on CPUs (see
entropy_sgd/noise.py). This repository rule builds it with the host's g++
and TensorFlow's own compile and link flags (`tf.sysconfig`), at fetch time,
offline. Without g++, or if the build fails, the repository holds no library
and noise.py uses TensorFlow ops; the reason is in `status.txt`.

It reruns when the kernel source or requirements.txt changes.
"""

_BUILD = """\
package(default_visibility = ["//visibility:public"])

filegroup(
    name = "kernel",
    srcs = glob(["noise_kernel.so"]) + ["status.txt"],
)
"""

_FLAGS = "import tensorflow as tf; print(' '.join(tf.sysconfig.get_compile_flags() + tf.sysconfig.get_link_flags()))"

def _noise_kernel_impl(rctx):
    rctx.read(rctx.attr.requirements)
    source = rctx.path(rctx.attr.source)
    rctx.read(source)  # Tracked: edits to the kernel rebuild it.
    workspace_root = rctx.path(Label("//:WORKSPACE")).dirname
    python = "%s/.venv/bin/python3" % workspace_root
    rctx.file("BUILD.bazel", _BUILD)

    compiler = rctx.which("g++")
    if compiler == None:
        rctx.file("status.txt", "not built: no g++ on PATH\n")
        return
    flags = rctx.execute([python, "-c", _FLAGS], environment = {"TF_CPP_MIN_LOG_LEVEL": "3"})
    if flags.return_code != 0:
        rctx.file("status.txt", "not built: could not read TensorFlow's flags: %s\n" % flags.stderr[-500:])
        return

    # -march=native: built on the machine that runs it. No -ffast-math: the
    # arithmetic stays IEEE; only errno and trapping are dropped, so the loops
    # vectorise.
    command = [
        str(compiler),
        "-shared",
        "-fPIC",
        "-O3",
        "-march=native",
        "-fopenmp-simd",
        "-fno-math-errno",
        "-fno-trapping-math",
        "-w",
        str(source),
        "-o",
        "noise_kernel.so",
    ] + flags.stdout.strip().split(" ")
    result = rctx.execute(command, timeout = 600)
    if result.return_code != 0:
        rctx.delete("noise_kernel.so")
        rctx.file("status.txt", "not built: g++ failed: %s\n" % result.stderr[-2000:])
        return
    rctx.file("status.txt", "built\n")

noise_kernel = repository_rule(
    implementation = _noise_kernel_impl,
    attrs = {
        "source": attr.label(
            default = Label("//entropy_sgd:noise_kernel.cc"),
            allow_single_file = True,
        ),
        "requirements": attr.label(
            default = Label("//:requirements.txt"),
            allow_single_file = True,
        ),
    },
    doc = "Builds the optional CPU kernel of the Langevin noise.",
)
