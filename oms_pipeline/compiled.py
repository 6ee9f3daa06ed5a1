"""Which of the package's modules run compiled, and the guard that keeps a source checkout honest.

The hot modules are built as C extensions when the package is installed (setup.py, README
"Compiled modules"). In a source checkout (an editable install: `make run`, `make test`) each
extension sits beside its .py, and Python imports the extension first. Once the .py is edited
the extension is stale, and Python would go on running the old code. The finder installed
here imports such a module from its source instead: an edit always takes effect at once,
compiled again by `make build` (which `make test` and `make run` do first).

Installed packages (site-packages) are left alone: their files are written together and
never edited in place.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from typing import Any

PACKAGES = ("oms_pipeline", "stages")
_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)
_INSTALLED = ("site-packages", "dist-packages")


def _loads(directory: str, leaf: str) -> str:
    """How module `leaf` of `directory` loads: "compiled", "stale" (an extension older than the
    .py, outside site-packages: the .py is imported), "plain" (no extension) or "" (no such
    module there)."""
    try:
        edited = os.stat(os.path.join(directory, leaf + ".py")).st_mtime
    except OSError:
        return ""
    for suffix in _SUFFIXES:
        try:
            built = os.stat(os.path.join(directory, leaf + suffix)).st_mtime
        except OSError:
            continue
        installed = any(part in directory for part in _INSTALLED)
        return "stale" if edited > built and not installed else "compiled"
    return "plain"


class StaleExtensionGuard:
    """A `sys.meta_path` finder: a module of ours whose .py is newer than its extension is
    imported from the .py. Everything else is left to the ordinary finders."""

    @staticmethod
    def find_spec(fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if not path or fullname.partition(".")[0] not in PACKAGES:
            return None
        leaf = fullname.rpartition(".")[2]
        for directory in path:
            how = _loads(directory, leaf)
            if how == "stale":
                return importlib.util.spec_from_file_location(fullname, os.path.join(directory, leaf + ".py"))
            if how:
                return None  # the ordinary finders find the same file
        return None


def install() -> None:
    """Put the guard first in line (once); the packages' __init__ call it before any import."""
    if StaleExtensionGuard not in sys.meta_path:
        sys.meta_path.insert(0, StaleExtensionGuard)


def package_directories() -> list[str]:
    out = []
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        out.extend((spec.submodule_search_locations or []) if spec else [])
    return out


def status(directories: list[str] | None = None) -> dict[str, list[str]]:
    """What the packages' directories hold: the modules that load compiled, and those whose
    extension is older than their source (they load from the source)."""
    found: dict[str, list[str]] = {"compiled": [], "stale": []}
    for directory in package_directories() if directories is None else directories:
        parent = os.path.dirname(os.path.abspath(directory))
        for root, _, files in os.walk(directory):
            for name in sorted(f for f in files if f.endswith(".py")):
                how = _loads(root, name[:-3])
                if how in found:
                    found[how].append(os.path.relpath(os.path.join(root, name[:-3]), parent).replace(os.sep, "."))
    return found


def describe(directories: list[str] | None = None) -> str:
    """One line for logs and benchmark reports."""
    s = status(directories)
    if not s["compiled"] and not s["stale"]:
        return "plain Python (no compiled modules)"
    text = f"{len(s['compiled'])} modules compiled"
    return text + (f"; {len(s['stale'])} edited since, run from source: {', '.join(s['stale'])}"
                   if s["stale"] else "")
