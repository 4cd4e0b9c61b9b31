"""The package's shape, read from its source without importing it: layering rules and one home for each concept.

(a) Import graph: every module under ``wsss/`` is parsed with ``ast``; relative imports are resolved to
``wsss.<package>``; imports inside functions (lazy) and ``importlib.import_module("wsss...")`` count as well.
(b) One implementation: a constant, literal or entry point that belongs to one module appears nowhere else.
"""

from __future__ import annotations

import ast
import functools
import io
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "wsss"
TOP = ("cli", "demo")  # the entry points: nothing below them may import them

# package -> the wsss packages it may not import (directly, at module level or lazily)
FORBIDDEN: dict[str, set[str]] = {
    "models": {"train", "runtime", "export", "cli", "cam", "eval", "demo"},
    "data": {"models", "cam", "train", "runtime", "export", "cli", "eval", "kernels", "demo"},
    "cam": {"train", "runtime", "export", "cli", "demo"},
    "train": {"cli", "demo"},
    "runtime": {"cli", "demo"},
    "export": {"cli", "demo"},
    "eval": {"cli", "demo"},
}
LEAVES = {"kernels", ""}  # import nothing else from wsss ("" is the root package, wsss/__init__.py)


@dataclass(frozen=True)
class Edge:
    module: str  # importing module, e.g. wsss.models.loading
    target: str  # imported module or name, e.g. wsss.train.loop
    line: int
    path: str  # relative file path

    @property
    def source_pkg(self) -> str:
        return _package_of(self.module)

    @property
    def target_pkg(self) -> str:
        return _package_of(self.target)

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.module} imports {self.target}"


def _package_of(dotted: str) -> str:
    """``wsss.models.loading`` -> ``models``; ``wsss.cli`` -> ``cli``; ``wsss`` / ``wsss.__version__`` -> ``""``."""
    parts = dotted.split(".")
    if len(parts) < 2 or parts[1].startswith("__"):
        return ""
    return parts[1]


def _module_name(path: Path, root: Path) -> tuple[str, list[str]]:
    """(dotted module name, the package parts that relative imports start from)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), parts
    return ".".join(parts), parts[:-1]


def import_edges(source: str, module: str, package: list[str], path: str = "<string>") -> list[Edge]:
    """Every ``wsss`` import in ``source``, wherever it sits (module level, functions, ``TYPE_CHECKING`` blocks)."""
    edges = []
    for node in ast.walk(ast.parse(source, path)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                keep = len(package) - (node.level - 1)
                if keep < 1:
                    raise ValueError(f"{path}:{node.lineno}: relative import beyond the top-level package")
                base = ".".join(package[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # ``from . import cam`` imports the module wsss.<pkg>.cam; ``from .x import y`` the module wsss.<pkg>.x
            targets = [base] if node.module else [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                targets = [arg.value]
        edges += [Edge(module, t, node.lineno, path) for t in targets if t == "wsss" or t.startswith("wsss.")]
    return edges


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module"
    )


def _all_edges() -> list[Edge]:
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module, package = _module_name(path, ROOT)
        edges += import_edges(path.read_text(), module, package, str(path.relative_to(ROOT)))
    return edges


def violations(edges: list[Edge]) -> list[str]:
    bad = []
    for e in edges:
        src, dst = e.source_pkg, e.target_pkg
        if src == dst:
            continue
        if src in LEAVES:
            bad.append(f"{e}  (wsss.{src or '__init__'} is a leaf: it imports nothing else from wsss)")
        elif dst in FORBIDDEN.get(src, set()):
            bad.append(f"{e}  (wsss.{src} may not import wsss.{dst})")
    return bad


# ---------------------------------------------------------------------------------------------------- (a) graph


def test_the_import_graph_keeps_its_layers() -> None:
    edges = _all_edges()
    assert len(edges) > 100, "the parser found no imports: is the package where it should be?"
    packages = {e.source_pkg for e in edges}
    assert {"models", "data", "cam", "train", "runtime", "export", "eval", "cli"} <= packages
    bad = violations(edges)
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


def test_every_module_parses_and_has_a_known_package() -> None:
    known = {"", *FORBIDDEN, *LEAVES, *TOP}
    for path in PACKAGE.rglob("*.py"):
        module, _ = _module_name(path, ROOT)
        assert _package_of(module) in known, f"{path}: package {_package_of(module)!r} has no layering rule"


def _edges_of(source: str, module: str = "wsss.models.thing") -> list[Edge]:
    parts = module.split(".")
    return import_edges(source, module, parts[:-1])


def test_the_checker_resolves_relative_lazy_and_dynamic_imports() -> None:
    """The rules can fail: fed sources that break them, the checker names module and line."""
    src = (
        "from .spec import ModelSpec\n"  # fine: wsss.models.spec
        "from ..data.transforms import IMAGENET_MEAN\n"  # fine: models -> data
        "from .. import __version__\n"  # fine: the root
        "def f():\n"
        "    from ..train.loop import train\n"  # lazy: still an edge
        "    import wsss.cam.pipeline as p\n"
        "    return importlib.import_module('wsss.runtime.backends')\n"
        "from .. import cli\n"
    )
    edges = _edges_of(src)
    assert sorted((e.line, e.target) for e in edges) == [
        (1, "wsss.models.spec"), (2, "wsss.data.transforms"), (3, "wsss.__version__"), (5, "wsss.train.loop"),
        (6, "wsss.cam.pipeline"), (7, "wsss.runtime.backends"), (8, "wsss.cli"),
    ]  # fmt: skip
    bad = violations(edges)
    assert len(bad) == 4 and all("<string>" in b and "wsss.models.thing" in b for b in bad)
    assert any(":5: wsss.models.thing imports wsss.train.loop" in b for b in bad)
    # an __init__ resolves "." to itself; a kernel importing the root is refused; data may not import models
    init = import_edges("from .loading import load_model\n", "wsss.models", ["wsss", "models"])
    assert [e.target for e in init] == ["wsss.models.loading"]
    assert violations(_edges_of("from .. import __version__\n", "wsss.kernels.x"))
    assert violations(_edges_of("from ..models import ModelSpec\n", "wsss.data.x"))
    assert not violations(_edges_of("from ..data import tags\nfrom .dispatch import x\n", "wsss.cam.x"))


def _module_file(dotted: str, root: Path = ROOT) -> Path | None:
    path = root.joinpath(*dotted.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


@functools.cache
def _top_level_names(path: Path) -> set[str]:
    """Names a module defines or imports at top level (inside ``if`` / ``try`` blocks too)."""
    names, todo = set(), list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try, ast.ExceptHandler, ast.With)):
            todo += [*node.body, *getattr(node, "orelse", []), *getattr(node, "handlers", []),
                     *getattr(node, "finalbody", [])]  # fmt: skip
    return names


def dangling_imports(root: Path = ROOT) -> list[str]:
    """``from wsss.x import y`` where module ``wsss.x`` or its name ``y`` no longer exists (removed in a refactor)."""
    bad = []
    for path in sorted((root / "wsss").rglob("*.py")):
        _, package = _module_name(path, root)
        rel = path.relative_to(root)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                bad += [f"{rel}:{node.lineno}: no module {a.name}" for a in node.names
                        if a.name.startswith("wsss") and _module_file(a.name, root) is None]  # fmt: skip
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                if not (base == "wsss" or base.startswith("wsss.")):
                    continue
                target = _module_file(base, root)
                if target is None:
                    bad.append(f"{rel}:{node.lineno}: no module {base}")
                    continue
                names = _top_level_names(target)
                bad += [f"{rel}:{node.lineno}: {base} has no {a.name}" for a in node.names
                        if a.name not in names and _module_file(f"{base}.{a.name}", root) is None]  # fmt: skip
    return bad


def test_imports_resolve() -> None:
    """No module imports a module or name that the refactor removed (cam.infer, cam.multiscale, load_any, ...)."""
    bad = dangling_imports()
    assert not bad, "imports of removed modules or names:\n" + "\n".join(bad)


def test_the_dangling_import_check_can_fail(tmp_path: Path) -> None:
    pkg = tmp_path / "wsss"
    (pkg / "cam").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cam" / "__init__.py").write_text("from .cobra import attention_background\n")
    (pkg / "cam" / "cobra.py").write_text("import math\ntry:\n    X = 1\nexcept Exception:\n    pass\n"
                                          "def attention_background():\n    pass\n")  # fmt: skip
    (pkg / "user.py").write_text("from .cam.cobra import fuse, X, attention_background\nfrom .cam import cobra\n"
                                 "def f():\n    from .cam.multiscale import normalize_cam\n")  # fmt: skip
    assert sorted(dangling_imports(tmp_path)) == ["wsss/user.py:1: wsss.cam.cobra has no fuse",
                                          "wsss/user.py:4: no module wsss.cam.multiscale"]  # fmt: skip


# ---------------------------------------------------------------------------------------------- (b) one home


@functools.cache
def _sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def _number_literals(source: str, value: str) -> list[int]:
    """Lines where ``value`` appears as a number token (comments and strings do not count)."""
    toks = tokenize.generate_tokens(io.StringIO(source).readline)
    return [t.start[0] for t in toks if t.type == tokenize.NUMBER and t.string == value]


def _calls(source: str, name: str, owner: str | None = None) -> list[tuple[int, str]]:
    """(line, enclosing function) of each call ``name(...)`` or ``x.name(...)`` in ``source``; with ``owner``, of
    ``owner.name(...)`` only."""
    out = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            here = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.Call):
                f = child.func
                if isinstance(f, ast.Attribute):
                    hit = f.attr == name and (owner is None or (isinstance(f.value, ast.Name) and f.value.id == owner))
                else:
                    hit = owner is None and isinstance(f, ast.Name) and f.id == name
                if hit:
                    out.append((child.lineno, func))
            visit(child, here)

    visit(ast.parse(source), "<module>")
    return out


def _code_only(source: str) -> str:
    """``source`` without comments and string literals (docstrings included), for grep-style checks."""
    toks = tokenize.generate_tokens(io.StringIO(source).readline)
    return " ".join(t.string for t in toks if t.type not in (tokenize.COMMENT, tokenize.STRING))


def _assignments(source: str, name: str) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(source)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []  # fmt: skip
        for t in targets:
            for n in ast.walk(t):
                if isinstance(n, ast.Name) and n.id == name:
                    lines.append(node.lineno)
    return lines


def test_norm_eps_is_defined_once() -> None:
    """The CAM normalisation eps (1.5), (4.17): one assignment, in cam_post.py (exported by wsss.kernels)."""
    where = {path: lines for path, src in _sources().items() if (lines := _assignments(src, "NORM_EPS"))}
    assert list(where) == ["wsss/kernels/cam_post.py"] and len(where["wsss/kernels/cam_post.py"]) == 1, where


@pytest.mark.parametrize(("literal", "name"), [("0.485", "IMAGENET_MEAN"), ("0.229", "IMAGENET_STD")])
def test_imagenet_normalisation_literals_have_one_home(literal: str, name: str) -> None:
    where = {path: lines for path, src in _sources().items() if (lines := _number_literals(src, literal))}
    assert list(where) == ["wsss/data/transforms.py"] and len(where["wsss/data/transforms.py"]) == 1, (
        f"the ImageNet literal {literal} appears outside wsss/data/transforms.py (use {name}): {where}"
    )


def test_the_text_checks_can_fail() -> None:
    src = (
        "import torch\n"
        "MEAN = (0.485, 0.456)  # 0.485\n"
        "NORM_EPS: float = 1e-5\n"
        "def f(p):\n"
        "    '''torch.load(p) and 0.485 in a docstring do not count'''\n"
        "    state = torch.load(p)\n"
        "    return CAMSettings(flip=True), wsss.models.CAMSettings(), CAMSettings.for_family('cam')\n"
        "NORM_EPS = 1e-8\n"
    )
    assert _number_literals(src, "0.485") == [2]
    assert _calls(src, "load", "torch") == [(6, "f")]
    assert _calls(src, "CAMSettings") == [(7, "f"), (7, "f")]
    assert _calls(src, "for_family", "CAMSettings") == [(7, "f")]
    assert sorted(_assignments(src, "NORM_EPS")) == [3, 8]
    code = " ".join(_code_only(src).split())
    assert code.count("torch . load (") == 1 and "docstring" not in code


def test_torch_load_only_in_the_checkpoint_reader_and_the_resume_state() -> None:
    where = {path: calls for path, src in _sources().items() if (calls := _calls(src, "load", "torch"))}
    assert set(where) <= {"wsss/models/checkpoint.py", "wsss/train/loop.py"}, where
    assert "wsss/models/checkpoint.py" in where
    assert {func for _, func in where.get("wsss/train/loop.py", [])} <= {"_resume"}, where
    for path, src in _sources().items():  # the text as well: `torch . load (` however spaced, or imported bare
        code = " ".join(_code_only(src).split())
        if path not in where:
            assert "torch . load (" not in code, path
        assert "from torch import load" not in code and "from torch . serialization import load" not in code, path


def test_cam_settings_are_constructed_only_in_the_spec_module() -> None:
    where = {path: calls for path, src in _sources().items() if (calls := _calls(src, "CAMSettings"))}
    assert set(where) <= {"wsss/models/spec.py"}, (
        f"CAMSettings(...) built outside wsss/models/spec.py (use CAMSettings.for_family / .replace): {where}"
    )


def test_load_checkpoint_is_called_only_by_the_loader() -> None:
    where = {path: calls for path, src in _sources().items() if (calls := _calls(src, "load_checkpoint"))}
    assert set(where) <= {"wsss/models/loading.py"}, (
        f"load_checkpoint(...) called outside wsss/models/loading.py (use load_model / load_state_into): {where}"
    )


def test_the_cli_seed_source_choices_mirror_the_spec() -> None:
    """`wsss --help` must not import torch, so the CLI repeats the seed-source list; it must stay the spec's."""
    from wsss.cli import SEED_SOURCES as cli_sources
    from wsss.models.spec import SEED_SOURCES

    assert cli_sources == SEED_SOURCES


def test_every_cuda_only_test_carries_the_gpu_marker():
    """The GPU check runs ``pytest -m gpu``: a test that skips without CUDA but lacks the marker would never run."""
    unmarked = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            decorators = [ast.unparse(d) for d in node.decorator_list]
            needs_cuda = any("skipif(not torch.cuda.is_available()" in d for d in decorators)
            if needs_cuda and not any("pytest.mark.gpu" in d for d in decorators):
                unmarked.append(f"{path.name}::{node.name}")
    assert not unmarked, f"skip without CUDA but not marked @pytest.mark.gpu: {unmarked}"
