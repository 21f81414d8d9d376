"""Compiles entropy_sgd/core/noise_kernel.cc against the venv's TensorFlow.

The kernel is an optional speed-up of the Langevin noise on CPUs (see
entropy_sgd/core/noise.py). The repository rule `noise_kernel` runs
`python -m entropy_sgd.core.build_noise_kernel` (the command pip users run; it
holds the compiler flags) with the host's g++, at fetch time, offline.
Without g++, or if the build fails, the repository holds no library and
`noise_kernel_status.txt` says why.

It reruns when the kernel source, the build module or requirements.txt
changes; after installing g++, `./bazelw sync --only=noise_kernel` reruns
it.

`kernel_beside_module` puts the library and its status file in the
package that loads them (entropy_sgd/core/), so in runfiles they sit beside
noise.py, where a pip install puts them too.
"""

LIBRARY = "noise_kernel.so"
STATUS = "noise_kernel_status.txt"

_BUILD = """\
package(default_visibility = ["//visibility:public"])

filegroup(
    name = "kernel",
    srcs = glob(["{library}", "{library}.cpu"]) + ["{status}"],
)
""".format(library = LIBRARY, status = STATUS)

def _noise_kernel_impl(rctx):
    rctx.read(rctx.attr.requirements)
    rctx.read(rctx.attr.source)  # Tracked: edits to the kernel rebuild it.
    rctx.read(rctx.attr.builder)  # So are edits to its build command.
    workspace_root = rctx.path(Label("//:WORKSPACE")).dirname
    python = "%s/.venv/bin/python3" % workspace_root
    rctx.file("BUILD.bazel", _BUILD)

    compiler = rctx.which("g++")
    if compiler == None:
        rctx.file(STATUS, "not built: no g++ on PATH\n")
        return
    result = rctx.execute(
        [
            python,
            "-m",
            "entropy_sgd.core.build_noise_kernel",
            "--source=%s" % rctx.path(rctx.attr.source),
            "--output=%s" % rctx.path(LIBRARY),
            "--compiler=%s" % compiler,
        ],
        environment = {
            "PYTHONPATH": str(workspace_root),
            "TF_CPP_MIN_LOG_LEVEL": "3",
        },
        timeout = 900,
    )
    if result.return_code != 0:
        rctx.delete(LIBRARY)
        rctx.delete(LIBRARY + ".cpu")
        # The module's last line is its one-line `error:`.
        last = (result.stderr.strip().split("\n") or [""])[-1]
        reason = last.replace("error: noise kernel not built: ", "")
        rctx.file(STATUS, "not built: %s\n" % reason[-2000:])
        return
    rctx.file(STATUS, "built\n")

noise_kernel = repository_rule(
    implementation = _noise_kernel_impl,
    attrs = {
        "source": attr.label(
            default = Label("//entropy_sgd/core:noise_kernel.cc"),
            allow_single_file = True,
        ),
        "builder": attr.label(
            default = Label("//entropy_sgd/core:build_noise_kernel.py"),
            allow_single_file = True,
        ),
        "requirements": attr.label(
            default = Label("//:requirements.txt"),
            allow_single_file = True,
        ),
    },
    doc = "Builds the optional CPU kernel of the Langevin noise.",
)

def _kernel_beside_module_impl(ctx):
    outputs = []
    for file in ctx.files.srcs:
        output = ctx.actions.declare_file(file.basename)
        ctx.actions.symlink(output = output, target_file = file)
        outputs.append(output)
    return [DefaultInfo(
        files = depset(outputs),
        runfiles = ctx.runfiles(files = outputs),
    )]

kernel_beside_module = rule(
    implementation = _kernel_beside_module_impl,
    attrs = {"srcs": attr.label_list(allow_files = True)},
    doc = "The files of `srcs`, by their basenames, in this package.",
)
