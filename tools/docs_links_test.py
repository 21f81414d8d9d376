"""Checks the repository's intra-repo documentation links.

Every relative link in a Markdown file (`[text](path#anchor)`, images too)
must name an existing file, and its anchor a heading of that file (GitHub's
rule: lowercase, punctuation removed, spaces to hyphens, -1, -2 for repeats).
Code and BUILD files may point at the docs as `docs/NAME.md#anchor` or
`README.md#anchor`; those must resolve as well. The source tree is found
through the requirements.txt runfile, as in pip_metadata_test; run directly
(`python3 tools/docs_links_test.py`) it is this file's repository.
"""

import os
import re
import unittest
from pathlib import Path

_SKIPPED_DIRS = {"runs", "node_modules", "__pycache__"}
_CODE_SUFFIXES = {".py", ".sh", ".cc", ".bzl", ".toml", ".txt", ""}
_LINK = re.compile(  # [text](target "title"), also ![image](...).
    r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]"
    r"\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE_REFERENCE = re.compile(
    r"(?<![\w/.-])((?:\.\./)*(?:README\.md|docs/[\w/.-]+\.md))(#[\w-]+)?")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _root():
    srcdir = os.environ.get("TEST_SRCDIR") or os.environ.get("RUNFILES_DIR")
    workspace = os.environ.get("TEST_WORKSPACE", "entropy_sgd")
    if srcdir:
        requirements = Path(srcdir) / workspace / "requirements.txt"
        if requirements.is_file():
            # The runfiles entry links into the source tree.
            return requirements.resolve().parent
    return Path(__file__).resolve().parent.parent


def _files(root, suffixes):
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs
                            if not d.startswith((".", "bazel-")) and
                            d not in _SKIPPED_DIRS)
        for name in sorted(names):
            path = Path(directory) / name
            if path.suffix in suffixes and not path.is_symlink():
                yield path


def _prose_lines(text):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading):
    """GitHub's anchor of a heading's text."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # Link text only.
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path):
    seen = {}
    result = set()
    text = path.read_text(encoding="utf-8")
    for _, line in _prose_lines(text):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    result.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    return result


class DocsLinksTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.root = _root()
        cls.anchor_cache = {}

    def _problem(self, source, number, target, base):
        """Why `target` (relative to `base`) does not resolve, or None."""
        path_part, _, anchor = target.partition("#")
        path = (base / path_part).resolve() if path_part else source
        if not path.exists():
            return (f"{source.relative_to(self.root)}:{number}: {target}: "
                    f"no such file")
        if anchor and path.suffix == ".md":
            if path not in self.anchor_cache:
                self.anchor_cache[path] = anchors(path)
            if anchor not in self.anchor_cache[path]:
                return (f"{source.relative_to(self.root)}:{number}: {target}: "
                        f"no heading #{anchor} in {path.name}")
        return None

    def test_markdown_links_resolve(self):
        problems, checked = [], 0
        for path in _files(self.root, {".md"}):
            # Links may wrap lines: search the prose as one text, with the
            # code blanked out.
            lines = path.read_text(encoding="utf-8").splitlines()
            prose = dict(_prose_lines("\n".join(lines)))
            text = "\n".join(re.sub(r"`[^`\n]*`", "", prose.get(i + 1, ""))
                             for i in range(len(lines)))
            for match in _LINK.finditer(text):
                target = match.group(1)
                if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, mailto:
                    continue
                checked += 1
                number = text.count("\n", 0, match.start(1)) + 1
                problem = self._problem(path, number, target, path.parent)
                if problem:
                    problems.append(problem)
        self.assertGreater(checked, 50)
        self.assertEqual(problems, [])

    def test_code_references_to_the_docs_resolve(self):
        problems = []
        for path in _files(self.root, _CODE_SUFFIXES):
            if path.name == Path(__file__).name:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            for number, line in enumerate(text.splitlines(), 1):
                for target, anchor in _CODE_REFERENCE.findall(line):
                    target = re.sub(r"^(\.\./)+", "", target)
                    problem = self._problem(path, number, target + anchor,
                                            self.root)
                    if problem:
                        problems.append(problem)
        self.assertEqual(problems, [])

    def test_slug_follows_github(self):
        self.assertEqual(slug("Mixed precision (`--precision`)"),
                         "mixed-precision---precision")
        self.assertEqual(slug("CIFAR-10, WRN-16-1, 20 effective epochs"),
                         "cifar-10-wrn-16-1-20-effective-epochs")
        self.assertEqual(slug("The LeNet gap: architecture × initialisation"),
                         "the-lenet-gap-architecture--initialisation")
        self.assertEqual(slug("Presets (`entropy_sgd/config.py`)"),
                         "presets-entropy_sgdconfigpy")


if __name__ == "__main__":
    unittest.main()
