"""pkg:// paths: inside the package's folder only, found without running any package code."""

from __future__ import annotations

import sys

import pytest

from kdistill.core.errors import ConfigError
from kdistill.core.paths import resolve_path


def make_package(root, name, code="", files=()):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(code)
    for file in files:
        (folder / file).parent.mkdir(parents=True, exist_ok=True)
        (folder / file).write_text("x")
    return folder


def test_a_path_that_leaves_the_package_is_refused(tmp_path, monkeypatch):
    make_package(tmp_path, "kdpkg_escape", files=["data/a.txt"])
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_path("pkg://kdpkg_escape/data/a.txt", "data.options.paths[0]").read_text() == "x"
    with pytest.raises(ConfigError) as info:
        resolve_path("pkg://kdpkg_escape/../../../../etc/passwd", "data.options.paths[0]")
    assert info.value.problems[0].startswith("data.options.paths[0]: pkg://kdpkg_escape/../../../../etc/passwd leaves the "
                                             "package's folder")


def test_a_dotted_package_is_found_without_importing_its_parent(tmp_path, monkeypatch):
    sentinel = tmp_path / "ran"
    make_package(tmp_path, "kdpkg_parent", code=f"open({str(sentinel)!r}, 'w').write('imported')\n")
    make_package(tmp_path / "kdpkg_parent", "child", files=["model.gguf"])
    monkeypatch.syspath_prepend(str(tmp_path))
    path = resolve_path("pkg://kdpkg_parent.child/model.gguf", "teacher.options.model")
    assert path.read_text() == "x"
    assert not sentinel.exists() and "kdpkg_parent" not in sys.modules
    with pytest.raises(ConfigError, match="is not installed"):
        resolve_path("pkg://kdpkg_parent.nothing/model.gguf", "teacher.options.model")
