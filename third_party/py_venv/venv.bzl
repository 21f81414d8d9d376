"""Python toolchain backed by the project's virtualenv at <workspace>/.venv.

`./bazelw` creates the venv and installs requirements.txt into it; this rule
only points Bazel at it, so every py_binary/py_test runs with
<workspace>/.venv/bin/python3 without anyone activating the venv.

Usage in WORKSPACE:

    load("//third_party/py_venv:venv.bzl", "py_venv_toolchain")
    py_venv_toolchain(name = "py_venv")
    register_toolchains("@py_venv//:toolchain")
"""

def _py_venv_toolchain_impl(rctx):
    workspace_root = rctx.path(Label("//:WORKSPACE")).dirname

    # Reading requirements.txt through a Label makes Bazel track it, so this
    # rule re-runs whenever the pins change.
    rctx.read(rctx.attr.requirements)

    interpreter = rctx.path("%s/%s/bin/python3" % (workspace_root, rctx.attr.venv_dir))
    if not interpreter.exists:
        fail("Python venv missing: %s does not exist; run ./bazelw (e.g. `./bazelw test //...`) once to create %s/%s." %
             (interpreter, workspace_root, rctx.attr.venv_dir))

    rctx.template(
        "BUILD.bazel",
        rctx.attr._build_tpl,
        substitutions = {
            # Keep the unresolved .venv/bin/python3 path: resolving the symlink
            # would bypass the venv (python finds pyvenv.cfg next to argv[0]).
            "%{interpreter}": str(interpreter),
        },
        executable = False,
    )

py_venv_toolchain = repository_rule(
    implementation = _py_venv_toolchain_impl,
    attrs = {
        "requirements": attr.label(
            default = Label("//:requirements.txt"),
            allow_single_file = True,
            doc = "Pinned requirements installed into the venv; watched for changes.",
        ),
        "venv_dir": attr.string(
            default = ".venv",
            doc = "Venv directory, relative to the workspace root.",
        ),
        "_build_tpl": attr.label(
            default = Label("//third_party/py_venv:BUILD.venv.tpl"),
            allow_single_file = True,
        ),
    },
    local = True,
    doc = "Registers <workspace>/.venv/bin/python3 as the Python 3 toolchain.",
)
