"""Guards on the package layout: imports run one way, ``config`` is a leaf, ``import tpa_jax`` is light.

Every module of ``tpa_jax`` belongs to a layer (``LAYERS``, lowest first; the longest matching
module prefix wins, so files added to a subpackage inherit its layer).  A module may import its
own layer or a lower one, never a higher one, whether the import sits at module level or inside
a function.  The walker reads the source with ``ast``: absolute and relative imports,
``from . import x`` resolved to the submodule ``x``, and ``importlib.import_module`` with a
literal name.  Importing the root package ``tpa_jax`` itself counts as importing what its
``__init__`` imports eagerly.  The root ``__init__`` re-exports and is checked on its own (by a
clean interpreter).  The scripts outside the package (``bench/``, ``train.py``, ``eval.py``) sit
above every layer and may import anything, so they are not walked.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterable, NamedTuple, Optional

from _util import ROOT

PACKAGE = "tpa_jax"
PACKAGE_DIR = ROOT / PACKAGE

LAYERS = {  # module prefix -> layer, lowest first
    "tpa_jax.config": 0,
    "tpa_jax.configs": 1,
    "tpa_jax.parallel": 1,
    "tpa_jax.model": 2,
    "tpa_jax.accounting": 2,
    "tpa_jax.interop": 2,
    "tpa_jax.inference": 3,
    "tpa_jax.data": 4,
    "tpa_jax.train": 5,
    "tpa_jax.eval": 6,
    "tpa_jax.compare": 6,
    "tpa_jax.run": 6,
    "tpa_jax.train.cli": 7,
    "tpa_jax.eval.cli": 7,
    "tpa_jax.compare.cli": 7,
    "tpa_jax.compare.__main__": 7,
}
ENTRY_POINTS = ("cli", "__main__")  # any module of these names is a command line: the top layer
TOP_LAYER = 7

# Same-layer imports that are still forbidden: importer prefix -> prefixes it must not import.
SAME_LAYER_FORBIDDEN = {
    "tpa_jax.model": ("tpa_jax.accounting", "tpa_jax.interop"),
}

# What a clean ``import tpa_jax`` must not load (top-level names in sys.modules).
HEAVY = ("optax", "orbax", "grain", "tensorboardX", "tensorboard", "tqdm", "matplotlib", "lm_eval")


# ---------------------------------------------------------------------------------------------- walker
class Import(NamedTuple):
    line: int
    target: str  # a module name, or PACKAGE for a name taken from the root package


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> Optional[int]:
    """The layer of a ``tpa_jax`` module (None: no rule assigns one)."""
    if module.rsplit(".", 1)[-1] in ENTRY_POINTS:
        return TOP_LAYER
    prefixes = [p for p in LAYERS if _matches(module, p)]
    return LAYERS[max(prefixes, key=len)] if prefixes else None


def package_modules(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """{module name: file} for every .py under the package (``__init__`` names its package)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve_relative(module: str, is_package: bool, level: int, name: Optional[str]) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(source: str, module: str, is_package: bool, known: Iterable[str]) -> list[Import]:
    """Every ``tpa_jax`` import in ``source`` (the module ``module``), anywhere in the file."""
    known = set(known)
    found = []

    def add(line: int, target: str) -> None:
        if _matches(target, PACKAGE):
            found.append(Import(line, target))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = (_resolve_relative(module, is_package, node.level, node.module) if node.level
                    else node.module or "")
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(node.lineno, sub if sub in known else base)
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            name = node.args[0].value
            if name.startswith("."):
                level = len(name) - len(name.lstrip("."))
                name = _resolve_relative(module, is_package, level, name.lstrip(".") or None)
            add(node.lineno, name)
    return sorted(set(found))


def root_layer(modules: dict[str, Path]) -> int:
    """The layer of ``import tpa_jax``: the highest layer its ``__init__`` imports eagerly."""
    tree = ast.parse(modules[PACKAGE].read_text())
    eager = []
    for node in tree.body:  # module level only: the lazy names are imported inside functions
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            src = ast.Module(body=[node], type_ignores=[])
            eager += imports_of(ast.unparse(src), PACKAGE, True, modules)
    layers = [layer_of(i.target) for i in eager if i.target != PACKAGE]
    return max(layer for layer in layers if layer is not None)


def violations(module: str, source: str, is_package: bool, known: Iterable[str], root: int,
               path: str = "") -> list[str]:
    """One line per import of ``module`` that goes upward or breaks a same-layer rule."""
    mine = layer_of(module)
    out = []
    for imp in imports_of(source, module, is_package, known):
        theirs = root if imp.target == PACKAGE else layer_of(imp.target)
        where = f"{path or module}:{imp.line} "
        if theirs is None:
            out.append(f"{where}{module} -> {imp.target} (imported module has no layer)")
        elif theirs > mine:
            out.append(f"{where}{module} -> {imp.target} (layer {mine} -> layer {theirs})")
        else:
            for importer, banned in SAME_LAYER_FORBIDDEN.items():
                if _matches(module, importer) and any(_matches(imp.target, b) for b in banned):
                    out.append(f"{where}{module} -> {imp.target} (layer {mine}: {importer} must not import it)")
    return out


def package_violations() -> list[str]:
    modules = package_modules()
    root = root_layer(modules)
    out = []
    for module, path in modules.items():
        if module == PACKAGE:
            continue  # the root re-exports; see test_import_tpa_jax_is_light
        out += violations(module, path.read_text(), path.name == "__init__.py", modules, root,
                          str(path.relative_to(ROOT)))
    return out


# ---------------------------------------------------------------------------------------------- tests
def test_every_module_has_a_layer():
    unassigned = [m for m in package_modules() if m != PACKAGE and layer_of(m) is None]
    assert not unassigned, f"modules without a layer (add a prefix to LAYERS): {unassigned}"


def test_imports_run_one_way():
    found = package_violations()
    assert not found, "upward imports:\n" + "\n".join(found)


def test_config_is_a_leaf():
    modules = package_modules()
    for name, path in modules.items():
        if _matches(name, "tpa_jax.config"):
            found = [imp for imp in imports_of(path.read_text(), name, path.name == "__init__.py", modules)
                     if not _matches(imp.target, "tpa_jax.config")]
            assert not found, f"{name} imports from the rest of the package: {found}"


def test_root_package_imports_no_higher_than_inference():
    # ``import tpa_jax`` must stay cheap: data, train, eval, compare and run load on first use
    assert root_layer(package_modules()) <= LAYERS["tpa_jax.inference"]


def test_layer_rules():
    assert layer_of("tpa_jax.config") == 0 and layer_of("tpa_jax.configs") == 1
    assert layer_of("tpa_jax.model.attention.kernels.flashtpa_pallas") == 2
    assert layer_of("tpa_jax.train.new_module") == 5 and layer_of("tpa_jax.train.cli") == 7
    assert layer_of("tpa_jax.compare") == 6 and layer_of("tpa_jax.compare.__main__") == 7
    assert layer_of("tpa_jax.data.cli") == TOP_LAYER
    assert layer_of("tpa_jax.unheard_of") is None and layer_of("tpa_jax.configsx") is None


KNOWN = ["tpa_jax", "tpa_jax.config", "tpa_jax.configs", "tpa_jax.accounting", "tpa_jax.interop",
         "tpa_jax.model", "tpa_jax.model.layers", "tpa_jax.model.attention", "tpa_jax.model.attention.tpa",
         "tpa_jax.train", "tpa_jax.train.loop", "tpa_jax.inference"]


def _synthetic(source: str, module: str = "tpa_jax.model.attention.fake", is_package: bool = False) -> list[str]:
    return violations(module, textwrap.dedent(source), is_package, KNOWN, root=3)


def test_walker_sees_upward_imports_anywhere():
    """The guard itself: a synthetic layer-2 module with upward imports in every form."""
    found = _synthetic("""
        import numpy as np
        from ...config import ModelConfig
        from .. import layers
        from . import tpa

        def train_later():
            from ...train import loop
            import tpa_jax.inference
            return loop

        class Lazy:
            def run(self):
                import importlib
                return importlib.import_module("tpa_jax.train.loop")
        """)
    assert found == [
        "tpa_jax.model.attention.fake:8 tpa_jax.model.attention.fake -> tpa_jax.train.loop (layer 2 -> layer 5)",
        "tpa_jax.model.attention.fake:9 tpa_jax.model.attention.fake -> tpa_jax.inference (layer 2 -> layer 3)",
        "tpa_jax.model.attention.fake:15 tpa_jax.model.attention.fake -> tpa_jax.train.loop (layer 2 -> layer 5)",
    ]


def test_walker_resolves_relative_and_root_imports():
    # ``from . import x`` in a package __init__ resolves against the package itself
    assert _synthetic("from . import loop\n", module="tpa_jax.train", is_package=True) == []
    assert _synthetic("from ..train import loop\n", module="tpa_jax.model", is_package=True) == [
        "tpa_jax.model:1 tpa_jax.model -> tpa_jax.train.loop (layer 2 -> layer 5)"]
    # the root package counts as what it imports eagerly (root=3 here)
    assert _synthetic("import tpa_jax\n") == [
        "tpa_jax.model.attention.fake:1 tpa_jax.model.attention.fake -> tpa_jax (layer 2 -> layer 3)"]
    assert _synthetic("from tpa_jax import ModelConfig\n", module="tpa_jax.data.x") == []
    # same layer: accounting may import model, model may not import accounting or interop
    assert _synthetic("from .. import accounting, interop\n", module="tpa_jax.model.layers") == [
        "tpa_jax.model.layers:1 tpa_jax.model.layers -> tpa_jax.accounting "
        "(layer 2: tpa_jax.model must not import it)",
        "tpa_jax.model.layers:1 tpa_jax.model.layers -> tpa_jax.interop (layer 2: tpa_jax.model must not import it)"]
    assert _synthetic("from .model import layers\n", module="tpa_jax.accounting") == []
    assert _synthetic("from ..nowhere import x\n", module="tpa_jax.model.layers") == [
        "tpa_jax.model.layers:1 tpa_jax.model.layers -> tpa_jax.nowhere (imported module has no layer)"]


def test_import_tpa_jax_is_light():
    """A clean interpreter: ``import tpa_jax`` loads none of HEAVY; ``load`` and ``Run`` resolve lazily."""
    code = textwrap.dedent(f"""
        import sys
        import tpa_jax
        heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
        assert not heavy, f"import tpa_jax loaded {{heavy}}"
        assert "tpa_jax.run" not in sys.modules, "tpa_jax.run imported eagerly"
        assert callable(tpa_jax.load) and isinstance(tpa_jax.Run, type)
        assert "tpa_jax.run" in sys.modules
        print("ok")
        """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


MAX_LINES = 400  # a file longer than this is split by responsibility


def test_no_source_file_over_the_line_limit():
    long = []
    for folder in ("tpa_jax", "tests", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            n = len(path.read_text().splitlines())
            if n > MAX_LINES:
                long.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert not long, f"files over {MAX_LINES} lines: " + "; ".join(long)
