"""The megatron surface, checked where it cannot run.

megatron-core 0.17+ needs Python 3.12, which this machine lacks, while GPU clusters run those
releases in their containers. This test reads (``ast``, no import) every ``megatron`` name this
project uses and checks it against the *source* of each release:

* what is used: every ``import megatron...`` / ``from megatron... import X`` of the modules
  that talk to megatron (``MEGATRON_SEAM`` of tests/test_architecture.py: ``compat``,
  ``model``, ``attention``, ``fused_head``, ``cpu_backend``, ``lora``),
  every attribute chain on an imported megatron object (``parallel_state.get_..._rank``),
  every keyword passed to a megatron callable (also through ``**kwargs`` built by ``dict(...)``
  in the same function), every method a subclass overrides (megatron calls it with its own
  parameters), every ``self.X`` a subclass reads without setting it, and the keywords
  ``runtime`` passes to the callables that ``compat`` hands out (the pipeline schedule);
* where it is checked: the newest patch of 0.17, 0.18 and 0.19 (wheels from the registry,
  ``pip download --no-deps --python-version 3.12 --only-binary=:all:``, into the test
  session's temporary folder; skipped with the reason when the registry cannot be
  reached), and the installed release (0.16.1) as the positive control. A made-up name,
  keyword and override are the negative control: the checker must report them.

Names that the code looks up conditionally (``getattr(x, name, default)``, ``compat._accepts``)
are optional by design and not required. What is missing only in some releases on purpose is
listed in :data:`ALLOWED_MISSING` with the reason. The results table is in docs/environment.md.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_architecture import MEGATRON_SEAM

from conftest import REPO

PKG = REPO / "probsft_megatron"
FACADE = sorted(MEGATRON_SEAM)  # the modules allowed to import megatron
RELEASES = ["0.17.1", "0.18.2", "0.19.2"]

# compat functions that return megatron callables, and what they can be in megatron's source
HANDED_OUT = {
    "get_forward_backward_func": [
        "megatron.core.pipeline_parallel.schedules.forward_backward_no_pipelining",
        "megatron.core.pipeline_parallel.schedules.forward_backward_pipelining_without_interleaving",
        "megatron.core.pipeline_parallel.schedules.forward_backward_pipelining_with_interleaving",
    ],
}
# our class -> the megatron class it stands in for (megatron's layer spec calls ours in its place)
STANDS_IN_FOR = {
    "SDPAttention": "megatron.core.transformer.dot_product_attention.DotProductAttention",
}
# (what, reason): names legitimately absent from some releases; none today (0.14-only code paths
# reach megatron through getattr/_accepts or untyped objects, which are not requirements)
ALLOWED_MISSING: dict[str, str] = {}


# -- a release's source, read with ast --------------------------------------------------------


class Source:
    """The ``megatron/`` python files of one release: module name -> parsed module."""

    def __init__(self, texts: dict[str, str], label: str) -> None:
        self.label = label
        self.texts = texts
        self._trees: dict[str, ast.Module] = {}

    @classmethod
    def from_wheel(cls, wheel: Path, label: str) -> Source:
        with zipfile.ZipFile(wheel) as z:
            texts = {
                n: z.read(n).decode("utf-8", "replace")
                for n in z.namelist()
                if n.startswith("megatron/") and n.endswith(".py")
            }
        return cls(texts, label)

    @classmethod
    def from_dir(cls, site: Path, label: str) -> Source:
        texts = {
            str(p.relative_to(site)): p.read_text("utf-8", "replace")
            for p in (site / "megatron").rglob("*.py")
        }
        return cls(texts, label)

    def module(self, dotted: str) -> ast.Module | None:
        if dotted not in self._trees:
            base = dotted.replace(".", "/")
            for path in (base + ".py", base + "/__init__.py"):
                if path in self.texts:
                    self._trees[dotted] = ast.parse(self.texts[path])
                    break
            else:
                if not any(t.startswith(base + "/") for t in self.texts):
                    return None
                self._trees[dotted] = ast.Module(body=[], type_ignores=[])  # namespace package
        return self._trees[dotted]

    # a symbol: ("module", dotted) | ("class"/"function", module, node) | ("value", module)
    def resolve(self, dotted: str, name: str, depth: int = 0):
        """What ``name`` is in module ``dotted`` (definitions, imports followed, star imports,
        submodules); None when it is not there."""
        tree = self.module(dotted)
        if tree is None or depth > 20:
            return None
        star = []
        for node in _top_level(tree):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                if node.name == name:
                    kind = "class" if isinstance(node, ast.ClassDef) else "function"
                    return (kind, dotted, node)
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name) and n.id == name:
                            return ("value", dotted)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if (a.asname or a.name.split(".")[0]) == name:
                        full = a.name if a.asname else a.name.split(".")[0]
                        kind = "module" if full.startswith("megatron") else "external"
                        return (kind, full)
            elif isinstance(node, ast.ImportFrom):
                src = _absolute(dotted, node, self.is_package(dotted))
                for a in node.names:
                    if a.name == "*":
                        star.append(src)
                    elif (a.asname or a.name) == name:
                        if src.startswith("megatron"):
                            return self.resolve(src, a.name, depth + 1) or (
                                ("module", f"{src}.{a.name}")
                                if self.module(f"{src}.{a.name}")
                                else None
                            )
                        return ("external", f"{src}.{a.name}")
        for src in star:
            found = self.resolve(src, name, depth + 1)
            if found:
                return found
        if self.module(f"{dotted}.{name}") is not None:
            return ("module", f"{dotted}.{name}")
        return None

    def is_package(self, dotted: str) -> bool:
        return dotted.replace(".", "/") + "/__init__.py" in self.texts

    def lookup(self, path: str):
        """A dotted path (``megatron.core.parallel_state.get_..._rank``) to its symbol."""
        parts = path.split(".")
        sym = ("module", parts[0]) if self.module(parts[0]) else None
        for part in parts[1:]:
            sym = self.attribute(sym, part) if sym else None
        return sym

    def attribute(self, sym, name: str, depth: int = 0):
        if sym is None or depth > 20:
            return None
        if sym[0] == "module":
            return self.resolve(sym[1], name)
        if sym[0] == "external":
            return _external_attribute(sym[1], name)
        if sym[0] != "class":
            return ("value", "?")  # an attribute of a value: not checked further
        _, module, node = sym
        for item in node.body:
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name == name:
                return ("function", module, item)
            if isinstance(item, ast.ClassDef) and item.name == name:
                return ("class", module, item)
            targets = (
                item.targets
                if isinstance(item, ast.Assign)
                else [item.target]
                if isinstance(item, ast.AnnAssign)
                else []
            )
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return ("value", module)
        for n in ast.walk(node):  # self.<name> = ... in any method
            if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and n.attr == name:
                if isinstance(n.value, ast.Name) and n.value.id == "self":
                    return ("value", module)
        for base in self.bases(sym):
            found = self.attribute(base, name, depth + 1)
            if found:
                return found
        return None

    def bases(self, sym) -> list:
        _, module, node = sym
        out = []
        for b in node.bases:
            path = _dotted(b)
            if not path:
                continue
            head, *rest = path.split(".")
            base = self.resolve(module, head)
            for part in rest:
                base = self.attribute(base, part)
            if base and base[0] in ("class", "external"):
                out.append(base)
        return out

    def parameters(self, sym) -> tuple[set[str], bool] | None:
        """The keyword names a callable accepts and whether it takes ``**kwargs``; None when
        the source cannot tell (a value, a class built elsewhere)."""
        if sym is None:
            return None
        if sym[0] == "function":
            a = sym[2].args
            names = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs} - {"self", "cls"}
            if a.kwarg is None:
                return names, False
            # def f(*args, **kwargs): return g(*args, **kwargs) accepts what g accepts
            for call in (n for n in ast.walk(sym[2]) if isinstance(n, ast.Call)):
                passed = [k.value for k in call.keywords if k.arg is None]
                callee = _dotted(call.func)
                if (
                    callee
                    and "." not in callee
                    and any(isinstance(v, ast.Name) and v.id == a.kwarg.arg for v in passed)
                ):
                    inner = self.parameters(self.resolve(sym[1], callee))
                    if inner is not None:
                        return names | inner[0], inner[1]
            return names, True
        if sym[0] != "class":
            return None
        init = self.attribute(sym, "__init__")
        if init and init[0] == "function":
            return self.parameters(init)
        return self.dataclass_fields(sym), False

    def dataclass_fields(self, sym, depth: int = 0) -> set[str]:
        fields = set()
        for base in (b for b in self.bases(sym) if b[0] == "class"):
            fields |= self.dataclass_fields(base, depth + 1) if depth < 20 else set()
        for item in sym[2].body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                fields.add(item.target.id)
        return fields


def _external_attribute(path: str, name: str):
    """An attribute of a class outside megatron (``torch.nn.Module``): asked of the installed
    library, instance attributes of ``torch.nn.Module`` included."""
    import importlib

    import torch

    try:
        obj = importlib.import_module(path)
    except ImportError:
        module, _, attr = path.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError):
            return None
    if hasattr(obj, name):
        return ("external", f"{path}.{name}")
    if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
        if hasattr(torch.nn.Module(), name):
            return ("external", f"{path}.{name}")
    return None


def _top_level(tree: ast.Module):
    """Module-level statements, including those inside top-level if/try blocks."""
    stack = list(tree.body)
    while stack:
        node = stack.pop(0)
        if isinstance(node, ast.If | ast.Try):
            stack[:0] = [
                *node.body,
                *getattr(node, "orelse", []),
                *[s for h in getattr(node, "handlers", []) for s in h.body],
                *getattr(node, "finalbody", []),
            ]
        else:
            yield node


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    keep = len(parts) - node.level + (1 if is_package else 0)
    base = ".".join(parts[:keep])
    return f"{base}.{node.module}" if node.module else base


def _dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


# -- what this project uses -------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Use:
    """One requirement: ``kind`` is name (``path`` must exist), keyword (``path`` accepts
    ``detail``), override (megatron calls our ``path`` with parameters ``detail``)."""

    kind: str
    path: str
    detail: str
    where: str

    def __str__(self) -> str:
        what = {"name": "", "keyword": f" keyword {self.detail!r}", "override": self.detail}
        return f"{self.path}{what[self.kind]} ({self.where})"


def collect(source_text: str, module: str, handed_out: dict | None = None) -> list[Use]:
    """Every megatron name, keyword and override one of our modules uses."""
    tree = ast.parse(source_text)
    env: dict[str, str] = {}  # local name -> megatron dotted path
    uses: list[Use] = []

    def at(node) -> str:
        return f"{module}.py:{node.lineno}"

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("megatron"):
                    env[a.asname or "megatron"] = a.name if a.asname else "megatron"
                    uses.append(Use("name", a.name, "", at(node)))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron"):
            for a in node.names:
                env[a.asname or a.name] = f"{node.module}.{a.name}"
                uses.append(Use("name", f"{node.module}.{a.name}", "", at(node)))
    for node in ast.walk(tree):  # aliases: fn = tensor_parallel.model_parallel_cuda_manual_seed
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, path = node.targets[0], _megatron_path(node.value, env)
            if isinstance(target, ast.Name) and path:
                env.setdefault(target.id, path)

    for func in [tree, *[n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]]:
        dicts = _dict_variables(func)
        for node in ast.walk(func):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                path = _megatron_path(node, env)
                if path and "." in path:
                    uses.append(Use("name", path, "", at(node)))
            if not isinstance(node, ast.Call):
                continue
            targets = []
            path = _megatron_path(node.func, env)
            if path:
                targets = [path]
            elif handed_out is not None:
                targets = _handed_out_targets(node, handed_out)
            for target in targets:
                for kw in _keywords(node, dicts):
                    uses.append(Use("keyword", target, kw, at(node)))

    classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}

    def own_names(cls: ast.ClassDef, depth: int = 0) -> set[str]:
        """What the class and its bases of this module (mixins) define themselves."""
        stores = [n for n in ast.walk(cls) if isinstance(n, ast.Attribute) and _is_self_store(n)]
        names = {n.attr for n in stores}
        names |= {m.name for m in cls.body if isinstance(m, ast.FunctionDef)}
        for b in cls.bases:
            if isinstance(b, ast.Name) and b.id in classes and depth < 10:
                names |= own_names(classes[b.id], depth + 1)
        return names

    for cls in classes.values():
        bases = [p for p in (_megatron_path(b, env) for b in cls.bases) if p]
        bases += [p for name, p in STANDS_IN_FOR.items() if name == cls.name]
        own = own_names(cls)
        methods = [m for m in cls.body if isinstance(m, ast.FunctionDef)]
        for base in bases:
            for m in methods:
                a = m.args
                params = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs} - {"self", "cls"}
                detail = ",".join(sorted(params)) + (",**" if a.kwarg else "")
                uses.append(Use("override", f"{base}.{m.name}", detail, at(m)))
            for n in ast.walk(cls):
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
                    if n.value.id == "self" and isinstance(n.ctx, ast.Load) and n.attr not in own:
                        uses.append(Use("name", f"{base}.{n.attr}", "", at(n)))
    return sorted(set(uses))


def _megatron_path(node, env: dict[str, str]) -> str | None:
    path = _dotted(node)
    if not path:
        return None
    head, *rest = path.split(".")
    if head not in env:
        return None
    return ".".join([env[head], *rest])


def _is_self_store(n: ast.Attribute) -> bool:
    return isinstance(n.ctx, ast.Store) and isinstance(n.value, ast.Name) and n.value.id == "self"


def _dict_variables(func) -> dict[str, list[str]]:
    """Keys of ``name = dict(k=...)`` / ``name = {"k": ...}`` in a function (for ``**name``)."""
    out: dict[str, list[str]] = {}
    for node in ast.walk(func):
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            t = node.targets[0] if isinstance(node, ast.Assign) else node.target
            keys = _dict_keys(node.value)
            if isinstance(t, ast.Name) and keys:
                out[t.id] = keys
    return out


def _dict_keys(v) -> list[str]:
    """Keys of ``dict(k=..., **f())``, ``{"k": ...}``, ``{} if c else {...}``; ``**x.f()`` is
    followed into the package's function ``f`` (the dicts it returns)."""
    if isinstance(v, ast.IfExp):
        return _dict_keys(v.body) + _dict_keys(v.orelse)
    keys: list[str] = []
    if isinstance(v, ast.Call) and _dotted(v.func) == "dict":
        keys += [k.arg for k in v.keywords if k.arg]
        for k in v.keywords:
            if k.arg is None and isinstance(k.value, ast.Call):
                keys += _returned_keys((_dotted(k.value.func) or "").split(".")[-1])
    elif isinstance(v, ast.Dict):
        keys += [k.value for k in v.keys if isinstance(k, ast.Constant)]
    return keys


def _returned_keys(name: str) -> list[str]:
    keys: list[str] = []
    for path in sorted(PKG.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name == name:
                for r in ast.walk(node):
                    if isinstance(r, ast.Return) and r.value is not None:
                        keys += _dict_keys(r.value)
    return keys


def _keywords(call: ast.Call, dicts: dict[str, list[str]]) -> list[str]:
    out = []
    for kw in call.keywords:
        if kw.arg:
            out.append(kw.arg)
        elif isinstance(kw.value, ast.Name):
            out += dicts.get(kw.value.id, [])
    return out


def _handed_out_targets(call: ast.Call, handed_out: dict) -> list[str]:
    """``compat.get_forward_backward_func()(...)`` and ``partial(compat.get_...(), ...)``."""
    inner = call.func
    if _dotted(inner) in ("partial", "functools.partial") and call.args:
        inner = call.args[0]
    if isinstance(inner, ast.Call):
        name = (_dotted(inner.func) or "").split(".")[-1]
        return handed_out.get(name, [])
    return []


def project_uses() -> list[Use]:
    uses = []
    for name in FACADE:
        uses += collect((PKG / f"{name}.py").read_text(), name)
    uses += [
        u
        for u in collect((PKG / "runtime.py").read_text(), "runtime", HANDED_OUT)
        if u.kind == "keyword"
    ]
    return sorted(set(uses))


def missing(uses: list[Use], source: Source) -> list[Use]:
    """The uses that ``source`` does not satisfy."""
    out = []
    for u in uses:
        sym = source.lookup(u.path)
        if u.kind == "name":
            ok = sym is not None
        elif u.kind == "keyword":
            params = source.parameters(sym)
            ok = params is not None and (u.detail in params[0] or params[1])
        else:  # override: megatron's parameters of the method must be ours (or ours take **)
            params = source.parameters(sym)
            ours = set(u.detail.split(",")) - {"**"}
            ok = params is None or u.detail.endswith("**") or params[0] <= ours
            if params is not None and not ok:
                u = Use(u.kind, u.path, f" lacks {sorted(params[0] - ours)}", u.where)
        if not ok and (u.path not in ALLOWED_MISSING or not sym):
            out.append(u)
    return out


# -- the releases ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def uses() -> list[Use]:
    found = project_uses()
    assert len(found) > 80, len(found)  # the collector sees the facade at all
    return found


@pytest.fixture(scope="session")
def wheel_dir(tmp_path_factory) -> Path:
    """The wheels of this test session (``make test`` runs pytest without its cache
    provider, and CI starts from empty caches: each session downloads them again)."""
    return tmp_path_factory.mktemp("megatron-core-wheels")


def release_source(version: str, wheel_dir: Path) -> Source:
    wheels = list(wheel_dir.glob(f"megatron_core-{version}-*.whl"))
    if not wheels:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--python-version",
            "3.12",
            "--only-binary=:all:",
            f"megatron-core=={version}",
            "-d",
            str(wheel_dir),
            "-q",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        wheels = list(wheel_dir.glob(f"megatron_core-{version}-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
            pytest.skip(f"megatron-core {version} could not be downloaded ({tail}): {cmd}")
    return Source.from_wheel(wheels[0], version)


def installed_source() -> Source:
    """The installed release's files (found, not imported)."""
    from importlib.metadata import version
    from importlib.util import find_spec

    site = Path(find_spec("megatron.core").origin).parents[2]
    return Source.from_dir(site, version("megatron-core"))


@pytest.mark.parametrize("version", RELEASES)
def test_newer_release_has_every_name_and_keyword(version, uses, wheel_dir):
    source = release_source(version, wheel_dir)
    gone = missing(uses, source)
    assert not gone, f"megatron-core {version} lacks:\n" + "\n".join(map(str, gone))


def test_installed_release_has_every_name_and_keyword(uses):
    """Positive control: the release the tests run has everything (else the checker is wrong)."""
    gone = missing(uses, installed_source())
    assert not gone, "\n".join(map(str, gone))


def test_made_up_names_keywords_and_overrides_are_reported():
    """Negative control: a name, a keyword (direct and through ``**dict``), an override
    missing a parameter megatron passes, and a ``runtime`` keyword of the handed-out schedule."""
    code = (
        "from megatron.core import parallel_state\n"
        "from megatron.core.transformer import TransformerConfig\n"
        "from megatron.core.tensor_parallel import ColumnParallelLinear\n"
        "def f():\n"
        "    parallel_state.get_tensor_model_parallel_rank()\n"
        "    parallel_state.no_such_function()\n"
        "    kw = dict(num_layers=2, no_such_field=1)\n"
        "    TransformerConfig(hidden_size=8, **kw)\n"
        "class Head(ColumnParallelLinear):\n"
        "    def forward(self, input_):\n"
        "        return self.no_such_attribute\n"
    )
    runtime = "def g():\n    compat.get_forward_backward_func()(model=1, no_such_kw=2)\n"
    found = collect(code, "made_up") + collect(runtime, "made_up_rt", HANDED_OUT)
    reported = missing(found, installed_source())
    gone = {(u.kind, u.path.split(".")[-1], u.detail.strip()) for u in reported}
    assert ("name", "no_such_function", "") in gone
    assert ("keyword", "TransformerConfig", "no_such_field") in gone
    assert ("override", "forward", "lacks ['runtime_gather_output', 'weight']") in gone
    assert ("name", "no_such_attribute", "") in gone
    assert ("keyword", "forward_backward_no_pipelining", "no_such_kw") in gone
    names = {(u.kind, u.path.split(".")[-1], u.detail) for u in found} - gone
    # the real ones are found and satisfied
    assert ("name", "get_tensor_model_parallel_rank", "") in names
    assert ("keyword", "TransformerConfig", "num_layers") in names
    assert ("keyword", "TransformerConfig", "hidden_size") in names
    real = {(u.kind, u.path.split(".")[-1], u.detail) for u in project_uses()}
    assert ("keyword", "TransformerConfig", "recompute_num_layers") in real  # via **dict(**f())
    assert ("keyword", "forward_backward_no_pipelining", "model") in names
