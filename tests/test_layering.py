"""The layering of STYLE.md: kernels/ imports only torch and triton; executor/ may import
kernels/ and lynx_sim/; lynx_sim/ imports neither. A run is built in one place (lynx_sim/setup.py)
for the simulator and the executor."""

from __future__ import annotations

import ast

import pytest

from conftest import ROOT

STDLIB_OK = {"__future__", "dataclasses", "typing", "math", "functools", "json", "pathlib", "os"}


def imported_modules(pkg: str) -> dict[str, set[str]]:
    """Every module each file imports, relative imports resolved (`from .setup import x` in
    lynx_sim/run.py is lynx_sim.setup)."""
    out = {}
    for path in (ROOT / pkg).rglob("*.py"):
        here = list(path.relative_to(ROOT).with_suffix("").parts)
        mods = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = here[:len(here) - node.level] if node.level else []
                mods.add(".".join(base + ([node.module] if node.module else [])))
        out[str(path.relative_to(ROOT))] = mods
    return out


def imported_roots(pkg: str) -> dict[str, set[str]]:
    return {f: {m.split(".")[0] for m in mods} for f, mods in imported_modules(pkg).items()}


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


def test_run_setup_has_one_home_and_the_run_driver_is_the_top():
    """lynx_sim/setup.py builds a run for the simulator and the executor alike; lynx_sim/run.py
    composes the summary and is imported only by its entry point (engine/ drives, metrics/ writes)."""
    mods = {**imported_modules("lynx_sim"), **imported_modules("executor")}
    assert "lynx_sim.setup" in mods["executor/run.py"] and "lynx_sim.setup" in mods["lynx_sim/run.py"]
    users = {f for f, m in mods.items() if "lynx_sim.run" in m}
    assert users == {"lynx_sim/__main__.py"}, users
    for f, m in mods.items():
        if f.startswith(("lynx_sim/engine/", "lynx_sim/metrics/")):
            assert "lynx_sim.setup" not in m, f"{f}: a driver takes the built setup, it does not build one"
