"""Checks that Bazel runs Python with the repo's .venv and the pinned packages.

This guards the toolchain from //third_party/py_venv: if it silently fell back
to some system interpreter, or the venv drifted from requirements.txt, this
test fails with a message saying what to do.
"""

import importlib.metadata
import os
import re
import sys
import unittest
from pathlib import Path

# Packages whose pins this test must find in requirements.txt.
REQUIRED_PINS = (
    "tensorflow",
    "dm-sonnet",
    "tensorflow-datasets",
    "absl-py",
    "tensorboard",
)

_PIN_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s;#]+)")


def _normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements_path():
    """Finds requirements.txt among this test's runfiles."""
    candidates = []
    srcdir = os.environ.get("TEST_SRCDIR") or os.environ.get("RUNFILES_DIR")
    workspace = os.environ.get("TEST_WORKSPACE", "entropy_sgd")
    if srcdir:
        candidates.append(Path(srcdir) / workspace / "requirements.txt")
    # cwd is <runfiles>/<workspace> under `bazel test`.
    candidates.append(Path.cwd() / "requirements.txt")
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        "requirements.txt not in runfiles (tried %s)" % ", ".join(map(str, candidates)))


def _pins(text):
    pins = {}
    for line in text.splitlines():
        match = _PIN_RE.match(line.strip())
        if match:
            pins[_normalize(match.group(1))] = match.group(3)
    return pins


class EnvironmentTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.requirements = _requirements_path()
        cls.pins = _pins(cls.requirements.read_text())

    def test_runs_in_a_venv(self):
        self.assertNotEqual(
            Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(),
            "sys.executable=%s is not a venv interpreter" % sys.executable)
        self.assertEqual(Path(sys.prefix).name, ".venv", sys.prefix)

    def test_venv_is_the_repos_venv(self):
        # The runfiles entry is a symlink into the source tree.
        repo_root = self.requirements.resolve().parent
        expected = (repo_root / ".venv").resolve()
        self.assertEqual(Path(sys.prefix).resolve(), expected,
                         "python is %s, not %s/bin/python3" % (sys.executable, expected))
        exe = Path(sys.executable)
        self.assertEqual(exe.parent.parent.resolve(), expected,
                         "sys.executable=%s is outside %s" % (exe, expected))

    def test_required_packages_are_pinned(self):
        missing = [p for p in REQUIRED_PINS if p not in self.pins]
        self.assertEqual(missing, [], "not pinned with == in %s" % self.requirements)

    def test_installed_versions_match_pins(self):
        mismatches = []
        for name, pinned in sorted(self.pins.items()):
            try:
                installed = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                installed = None
            if installed != pinned:
                mismatches.append("%s: pinned %s, installed %s" % (name, pinned, installed))
        self.assertEqual(
            mismatches, [],
            "venv does not match requirements.txt; run ./bazelw to reinstall")


if __name__ == "__main__":
    unittest.main()
