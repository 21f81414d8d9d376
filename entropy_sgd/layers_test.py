"""The package's layers import only downwards, and its BUILD files agree."""

import ast
import os
import re
import subprocess
import sys

from absl.testing import absltest

import entropy_sgd

PACKAGE_DIR = os.path.dirname(os.path.abspath(entropy_sgd.__file__))


def layer_modules():
  """(layer, module name, path) of every module in every layer."""
  for layer in entropy_sgd.LAYERS:
    directory = os.path.join(PACKAGE_DIR, layer)
    for name in sorted(os.listdir(directory)):
      if name.endswith(".py") and name != "__init__.py":
        yield layer, name[:-3], os.path.join(directory, name)


def imported_layers(path):
  """The entropy_sgd layers a file imports, with the line of each import."""
  tree = ast.parse(open(path).read(), path)
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = ([node.module] if "." in node.module else
               [f"{node.module}.{alias.name}" for alias in node.names])
    else:
      continue
    for name in names:
      parts = name.split(".")
      if parts[0] == "entropy_sgd":
        found.append((parts[1] if len(parts) > 1 else None, node.lineno))
  return found


def upward_imports(files):
  """'path:line: layer imports other' for each import against the order."""
  rank = {layer: i for i, layer in enumerate(entropy_sgd.LAYERS)}
  problems = []
  for layer, _, path in files:
    for imported, line in imported_layers(path):
      if imported is None or imported in entropy_sgd.PUBLIC:
        problems.append(f"{path}:{line}: {layer} imports through the "
                        f"package's public API; import entropy_sgd.LAYER.X")
      elif imported not in rank:
        problems.append(f"{path}:{line}: unknown layer {imported!r}")
      elif rank[imported] > rank[layer]:
        problems.append(f"{path}:{line}: {layer} imports {imported}")
  return problems


class LayersTest(absltest.TestCase):

  def test_every_subpackage_is_a_layer(self):
    subpackages = sorted(
        name for name in os.listdir(PACKAGE_DIR)
        if os.path.isdir(os.path.join(PACKAGE_DIR, name))
        and name != "__pycache__")
    self.assertEqual(subpackages, sorted(entropy_sgd.LAYERS))

  def test_no_module_imports_a_higher_layer(self):
    files = list(layer_modules())
    self.assertGreater(len(files), 20)
    self.assertEqual(upward_imports(files), [])

  def test_an_upward_import_is_found(self):
    path = self.create_tempfile(
        content="from entropy_sgd.core import noise\n"
                "from entropy_sgd.train import config\n"
                "from entropy_sgd import optimizers\n").full_path
    problems = upward_imports([("workloads", "fake", path)])
    self.assertLen(problems, 2)
    self.assertIn(":2: workloads imports train", problems[0])
    self.assertIn(":3: workloads imports through the package's public API",
                  problems[1])

  def test_visibility_admits_exactly_the_higher_layers(self):
    bzl = open(os.path.join(PACKAGE_DIR, "layers.bzl")).read()
    listed = re.search(r"^LAYERS = \[(.*?)\]", bzl, re.M | re.S).group(1)
    self.assertEqual(tuple(re.findall(r'"(\w+)"', listed)),
                     entropy_sgd.LAYERS)
    for i, layer in enumerate(entropy_sgd.LAYERS):
      build = open(os.path.join(PACKAGE_DIR, layer, "BUILD")).read()
      match = re.search(r"package\(default_visibility = (.*?)\)\n", build)
      self.assertIsNotNone(match, layer)
      expected = ('["//visibility:public"]' if i == 0 else
                  f'visible_above("{layer}")')
      self.assertEqual(match.group(1), expected, layer)
      self.assertIn("layer_files()", build, layer)

  def test_every_module_has_its_target(self):
    for layer, module, _ in layer_modules():
      build = open(os.path.join(PACKAGE_DIR, layer, "BUILD")).read()
      self.assertIn(f'name = "{module}"', build, f"{layer}/{module}")

  def test_public_api_resolves_lazily_without_tensorflow(self):
    for name, layer in entropy_sgd.PUBLIC.items():
      self.assertTrue(
          os.path.exists(os.path.join(PACKAGE_DIR, layer, name + ".py")), name)
    code = ("import sys, entropy_sgd\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
            "assert set(entropy_sgd.PUBLIC) <= set(dir(entropy_sgd))\n"
            "from entropy_sgd import algorithm\n"
            "assert algorithm is sys.modules['entropy_sgd.core.algorithm']\n"
            "try:\n  entropy_sgd.nothing\nexcept AttributeError as e:\n"
            "  print(e)\n")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        env=dict(os.environ,
                 PYTHONPATH=os.path.dirname(PACKAGE_DIR)), check=False)
    self.assertEqual(result.returncode, 0, result.stderr)
    self.assertIn("has no attribute 'nothing'", result.stdout)


if __name__ == "__main__":
  absltest.main()
