"""The layering of STYLE.md: kernels/ imports only torch and triton; executor/ may import
kernels/ and lynx_sim/; lynx_sim/ imports neither."""

from __future__ import annotations

import ast

import pytest

from conftest import ROOT

STDLIB_OK = {"__future__", "dataclasses", "typing", "math", "functools", "json", "pathlib", "os"}


def imported_roots(pkg: str) -> dict[str, set[str]]:
    out = {}
    for path in (ROOT / pkg).rglob("*.py"):
        roots = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = roots
    return out


def test_lynx_sim_imports_neither_kernels_nor_executor():
    for file, roots in imported_roots("lynx_sim").items():
        assert not roots & {"kernels", "executor"}, f"{file} imports {roots & {'kernels', 'executor'}}"


@pytest.mark.parametrize("pkg", ["kernels"])
def test_kernels_import_only_torch_and_triton(pkg):
    for file, roots in imported_roots(pkg).items():
        extra = roots - {"torch", "triton", "kernels"} - STDLIB_OK
        assert not extra, f"{file} imports {extra}"


def test_executor_imports_no_unexpected_project_package():
    for file, roots in imported_roots("executor").items():
        assert "traces" not in roots, f"{file}: trace code lives in lynx_sim.traces"
