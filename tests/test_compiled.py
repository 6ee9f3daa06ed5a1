"""The compiled modules (README "Compiled modules"): an edit always takes effect, and what the
build reports is what is imported."""
from __future__ import annotations

import importlib
import importlib.machinery
import os
import re
import sys
from pathlib import Path

import pytest

from oms_pipeline import compiled

ROOT = Path(__file__).resolve().parent.parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _module(directory: Path, leaf: str, *, source_at: float, built_at: float | None) -> None:
    source = directory / f"{leaf}.py"
    source.write_text("WHERE = 'source'\n")
    os.utime(source, (source_at, source_at))
    if built_at is not None:
        built = directory / f"{leaf}{SUFFIX}"
        built.write_bytes(b"")  # never loaded by these tests: only its time is read
        os.utime(built, (built_at, built_at))


def test_a_module_edited_after_its_build_is_imported_from_its_source(tmp_path):
    _module(tmp_path, "edited", source_at=2_000, built_at=1_000)
    spec = compiled.StaleExtensionGuard.find_spec("oms_pipeline.edited", [str(tmp_path)])
    assert spec is not None and spec.origin == str(tmp_path / "edited.py")


def test_an_up_to_date_build_and_plain_modules_are_left_to_the_ordinary_finders(tmp_path):
    _module(tmp_path, "built", source_at=1_000, built_at=2_000)
    _module(tmp_path, "plain", source_at=1_000, built_at=None)
    for leaf in ("built", "plain", "missing"):
        assert compiled.StaleExtensionGuard.find_spec(f"stages.{leaf}", [str(tmp_path)]) is None


def test_other_packages_and_installed_copies_are_left_alone(tmp_path):
    _module(tmp_path, "edited", source_at=2_000, built_at=1_000)
    assert compiled.StaleExtensionGuard.find_spec("elsewhere.edited", [str(tmp_path)]) is None
    installed = tmp_path / "lib" / "site-packages" / "oms_pipeline"
    installed.mkdir(parents=True)
    _module(installed, "edited", source_at=2_000, built_at=1_000)  # written together by pip, in any order
    assert compiled.StaleExtensionGuard.find_spec("oms_pipeline.edited", [str(installed)]) is None
    assert compiled.status([str(installed)]) == {"compiled": ["oms_pipeline.edited"], "stale": []}


def test_status_names_compiled_and_stale_modules(tmp_path):
    package = tmp_path / "stages"
    (package / "inner").mkdir(parents=True)
    _module(package, "fresh", source_at=1_000, built_at=2_000)
    _module(package / "inner", "edited", source_at=2_000, built_at=1_000)
    _module(package, "plain", source_at=1_000, built_at=None)
    assert compiled.status([str(package)]) == {"compiled": ["stages.fresh"], "stale": ["stages.inner.edited"]}
    assert compiled.describe([str(package)]) == \
        "1 modules compiled; 1 edited since, run from source: stages.inner.edited"
    assert compiled.describe([str(tmp_path / "empty")]) == "plain Python (no compiled modules)"


def test_the_guard_is_installed_first_by_the_package():
    assert sys.meta_path[0] is compiled.StaleExtensionGuard


def _listed() -> list[str]:
    text = (ROOT / "setup.py").read_text()
    block = text[text.index("COMPILED = ("):text.index(")", text.index("COMPILED = ("))]
    return [path[:-3].replace("/", ".") for path in re.findall(r'"([\w/]+\.py)"', block)]


def test_what_the_build_reports_is_what_is_imported():
    """After `make build` (as `make test` does) every module setup.py lists has an extension, and
    each one is imported as the report says: compiled, or from its source if edited since."""
    if os.environ.get("OMS_PURE_PYTHON"):
        pytest.skip("installed as plain Python (OMS_PURE_PYTHON)")
    found = compiled.status()
    if not found["compiled"] and not found["stale"]:
        if os.environ.get("CI") == "true":  # CI tests what `make test` built: a build that made nothing is a failure
            pytest.fail("no compiled modules: `make build` compiled nothing")
        pytest.skip("no compiled modules in this installation (no C compiler, or not built)")
    listed = _listed()
    assert sorted(found["compiled"] + found["stale"]) == sorted(listed)
    for name in listed:
        module = importlib.import_module(name)
        loaded_from_source = module.__file__.endswith(".py")
        assert loaded_from_source == (name in found["stale"]), name

