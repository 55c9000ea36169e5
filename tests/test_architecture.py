"""The import rule of docs/architecture.md, enforced by walking every import statement.

Layers point one way (a module imports only from its own layer or below), no two modules
import each other (directly or through others, lazily inside functions included), and
megatron is imported only by the modules of the seam. The walk reads the source with
``ast`` (nothing is imported), so it sees the function-level imports that keep heavy
libraries lazy, and the imports under ``if TYPE_CHECKING:`` too (a type-only import that
closes a circle still ties the two modules together for a reader and for type checkers). A
negative control feeds the checkers a graph that breaks each rule.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO

# import name of each source folder (pyproject.toml's package-dir)
PACKAGES = {
    "probsft_megatron": "probsft_megatron",
    "probsft_megatron.converters": "converters",
    "probsft_megatron.eval": "eval",
    "probsft_megatron.launchers": "launchers",
}

BASE, CORE, MEGATRON, JOBS = 0, 1, 2, 3
LAYER_NAMES = {
    BASE: "base",
    CORE: "config, maths and data",
    MEGATRON: "megatron layer",
    JOBS: "jobs",
}
LAYERS = {
    # 0: no torch at import time, no probsft module above
    "errors": BASE,
    "fileio": BASE,
    "manifest": BASE,
    "resources": BASE,
    "hardware": BASE,
    "console": BASE,
    "typed_yaml": BASE,
    "run_lock": BASE,
    # 1: torch-level maths, configuration and data; never megatron
    "config": CORE,
    "input_checks": CORE,
    "job": CORE,
    "objectives": CORE,
    "loss": CORE,
    "model_dir": CORE,
    "data": CORE,
    "figfont": CORE,
    "tokenizers": CORE,
    "embedded": CORE,
    # 2: everything that touches megatron-core
    "cpu_backend": MEGATRON,
    "compat": MEGATRON,
    "model": MEGATRON,
    "attention": MEGATRON,
    "fused_loss": MEGATRON,
    "fused_head": MEGATRON,
    "runtime": MEGATRON,
    "checkpoint": MEGATRON,
    "lora": MEGATRON,
}
"""Layer of each core module (``probsft_megatron.<name>`` and its submodules); every other
module (training, probe, converters, eval, launchers, the CLI) is a job, layer 3."""

MEGATRON_SEAM = {"compat", "model", "attention", "fused_head", "cpu_backend", "lora"}
"""The only modules that import megatron: version-dependent calls (compat), megatron
subclasses (model building, SDPA attention, the fused head, the LoRA linears) and the CPU
fallback."""


def _module_name(path: Path) -> str:
    for package, folder in PACKAGES.items():
        root = REPO / folder
        if path.is_relative_to(root):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join([package, *parts])
    raise AssertionError(path)


def _sources() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            name = _module_name(path)
            if package == "probsft_megatron" and any(
                name.startswith(p + ".") or name == p for p in PACKAGES if p != package
            ):
                continue  # a subpackage that lives in its own folder
            out[name] = path
    return out


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(edges, external)``: the probsft modules each module imports (anywhere in it), and
    the top-level names of the other packages it imports."""
    sources = _sources()
    edges: dict[str, set[str]] = {name: set() for name in sources}
    external: dict[str, set[str]] = {name: set() for name in sources}
    for name, path in sources.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in sources else base
                    for alias in node.names
                ]
            for target in targets:
                if target.split(".")[0] != "probsft_megatron":
                    external[name].add(target.split(".")[0])
                    continue
                while target not in sources and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target != name:
                    edges[name].add(target)
    return edges, external


def layer(module: str) -> int:
    parts = module.split(".")
    if (
        parts[0] == "probsft_megatron"
        and len(parts) > 1
        and f"probsft_megatron.{parts[1]}" not in PACKAGES
    ):
        return LAYERS.get(parts[1], JOBS)
    return JOBS


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{a} ({LAYER_NAMES[layer(a)]}) imports {b} ({LAYER_NAMES[layer(b)]})"
        for a, targets in edges.items()
        for b in targets
        if layer(b) > layer(a)
    )


def megatron_outside_seam(external: dict[str, set[str]]) -> list[str]:
    return sorted(
        m
        for m, names in external.items()
        if "megatron" in names and not (layer(m) == MEGATRON and m.split(".")[1] in MEGATRON_SEAM)
    )


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_walk_sees_every_module_and_lazy_imports(graph):
    edges, external = graph
    assert {
        "probsft_megatron.train",
        "probsft_megatron.probe.measure",
        "probsft_megatron.converters.api",
        "probsft_megatron.eval.runner",
    } <= set(edges)
    # function-level imports count: model.py imports megatron only inside functions
    assert "megatron" in external["probsft_megatron.model"]
    assert "probsft_megatron.fused_head" in edges["probsft_megatron.model"]


def test_every_package_ships():
    """Each package folder is listed in pyproject.toml (a wheel leaves out the others)."""
    import tomllib

    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    packages = {name for name, path in _sources().items() if path.name == "__init__.py"}
    assert packages <= listed, sorted(packages - listed)


def test_no_import_cycles(graph):
    edges, _ = graph
    assert find_cycles(edges) == []


def test_layers_point_one_way(graph):
    edges, _ = graph
    assert upward_imports(edges) == []


def test_megatron_only_behind_the_seam(graph):
    _, external = graph
    assert megatron_outside_seam(external) == []


def test_negative_controls_are_caught():
    edges = {
        "probsft_megatron.train": {"probsft_megatron.probe"},
        "probsft_megatron.probe": {"probsft_megatron.train"},
        "probsft_megatron.loss": {"probsft_megatron.runtime"},
        "probsft_megatron.runtime": set(),
    }
    assert find_cycles(edges) == [["probsft_megatron.probe", "probsft_megatron.train"]]
    assert upward_imports(edges) == [
        "probsft_megatron.loss (config, maths and data) imports probsft_megatron.runtime "
        "(megatron layer)"
    ]
    external = {
        "probsft_megatron.runtime": {"megatron", "torch"},
        "probsft_megatron.converters.megatron_io": {"megatron"},
        "probsft_megatron.compat": {"megatron"},
    }
    assert megatron_outside_seam(external) == [
        "probsft_megatron.converters.megatron_io",
        "probsft_megatron.runtime",
    ]


def test_config_and_dry_run_do_not_import_megatron(tmp_path):
    """cli.py's promise: only the chosen subcommand's heavy imports happen, and resolving a
    training job (what ``--dry-run`` does) needs no megatron."""
    script = textwrap.dedent(f"""
        import contextlib, io, sys
        import probsft_megatron.config, probsft_megatron.data, probsft_megatron.loss
        from probsft_megatron.cli import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(["objectives"]) == 0
            assert main(["train", "--config", "tiny-figfont-cpu", "--dry-run",
                         "train.output_dir={tmp_path}"]) == 0
        loaded = sorted(m for m in sys.modules if m == "megatron" or m.startswith("megatron."))
        print(loaded)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
