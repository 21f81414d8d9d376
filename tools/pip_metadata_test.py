"""Checks pyproject.toml (the pip metadata) against requirements.txt.

pip users get the dependency ranges of pyproject.toml; Bazel and CI use the
pins of requirements.txt. This test keeps the two consistent: every pin of a
declared dependency lies inside its range, every unpinned declared
dependency is satisfied by the venv, and every third-party module the
library imports belongs to a declared dependency. (tools/pip_check.sh, run
by .ci/run, builds and installs the wheel itself.) pyproject.toml and the
sources are read from the source tree that the requirements.txt runfile
links to.
"""

import ast
import importlib.metadata
import os
import re
import sys
import tomllib
import unittest
from pathlib import Path

from packaging.requirements import Requirement

# Top-level import name -> distribution, where they differ.
_DISTRIBUTIONS = {"absl": "absl-py", "sonnet": "dm-sonnet",
                  "tensorflow_datasets": "tensorflow-datasets"}


def _normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _runfile(name):
    srcdir = os.environ.get("TEST_SRCDIR") or os.environ.get("RUNFILES_DIR")
    workspace = os.environ.get("TEST_WORKSPACE", "entropy_sgd")
    candidates = [Path(srcdir) / workspace / name] if srcdir else []
    candidates += [Path.cwd() / name,
                   Path(__file__).resolve().parent.parent / name]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{name} not found (tried {candidates})")


def _pins(text):
    pins = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_normalize(name)] = version.strip()
    return pins


class PipMetadataTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        requirements = _runfile("requirements.txt")
        cls.pins = _pins(requirements.read_text())
        # The runfiles entry links into the source tree, which holds the rest.
        root = requirements.resolve().parent
        pyproject = root / "pyproject.toml"
        cls.project = tomllib.loads(pyproject.read_text())["project"]
        cls.package_dir = root / "entropy_sgd"
        cls.setuptools = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]
        cls.requirements = {
            _normalize(r.name): r
            for r in map(Requirement, cls.project["dependencies"])}

    def test_pins_lie_in_the_ranges(self):
        outside = [f"{name}=={self.pins[name]} is outside {requirement}"
                   for name, requirement in sorted(self.requirements.items())
                   if name in self.pins and not requirement.specifier.contains(
                       self.pins[name], prereleases=True)]
        self.assertEqual(outside, [])

    def test_unpinned_dependencies_are_satisfied_by_the_venv(self):
        problems = []
        for name, requirement in sorted(self.requirements.items()):
            if name in self.pins:
                continue
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                problems.append(f"{name} is not installed")
                continue
            if not requirement.specifier.contains(version, prereleases=True):
                problems.append(f"{name} {version} is outside {requirement}")
        self.assertEqual(problems, [])

    def test_the_pinned_libraries_are_declared(self):
        # Every pin except build helpers is something the library needs.
        undeclared = sorted(set(self.pins) - set(self.requirements))
        self.assertEqual(undeclared, [])

    def test_imports_are_declared(self):
        sources = [p for p in sorted(self.package_dir.glob("**/*.py"))
                   if not p.name.endswith("_test.py")]
        self.assertTrue(sources, self.package_dir)
        imported = set()
        for path in sources:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    imported.add(node.module.split(".")[0])
        third_party = {m for m in imported
                       if m not in sys.stdlib_module_names and
                       m not in ("entropy_sgd", "__future__")}
        undeclared = sorted(
            m for m in third_party
            if _normalize(_DISTRIBUTIONS.get(m, m)) not in self.requirements)
        self.assertEqual(undeclared, [])

    def test_packages_the_library(self):
        self.assertEqual(self.project["name"], "entropy-sgd")
        self.assertTrue((self.package_dir / "__init__.py").is_file())

    def test_every_subpackage_is_in_the_wheel(self):
        subpackages = sorted(
            "entropy_sgd." + p.parent.name
            for p in self.package_dir.glob("*/__init__.py"))
        self.assertGreater(len(subpackages), 1)
        self.assertEqual(sorted(self.setuptools["packages"]),
                         sorted(["entropy_sgd"] + subpackages))


if __name__ == "__main__":
    unittest.main()
