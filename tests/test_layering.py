"""The package boundary (docs/ARCHITECTURE.md): llama never imports kollama; kollama imports only llama's public
names (no leading underscore); importing any module changes no global state (default dtype, thread count,
llama's quantizer registry)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports(package: str):
    """(file, imported module, names) for every import anywhere in ``package`` (also inside functions)."""
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                yield path, node.module, [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    yield path, a.name, []


def test_llama_never_imports_kollama():
    bad = [(str(p.relative_to(ROOT)), m) for p, m, _ in imports("llama") if m.split(".")[0] == "kollama"]
    assert bad == []


def test_kollama_uses_only_public_llama_names():
    bad = [(str(p.relative_to(ROOT)), m, n) for p, m, names in imports("kollama") if m.split(".")[0] == "llama"
           for n in names if n.startswith("_")]
    bad += [(str(p.relative_to(ROOT)), m) for p, m, _ in imports("kollama")
            if m.split(".")[0] == "llama" and any(part.startswith("_") for part in m.split("."))]
    assert bad == []


def test_imports_change_no_global_state():
    modules = sorted({".".join(p.relative_to(ROOT).with_suffix("").parts) for pkg in ("llama", "kollama")
                      for p in (ROOT / pkg).rglob("*.py") if p.name != "__main__.py"})
    code = ("import torch, importlib; t, d = torch.get_num_threads(), torch.get_default_dtype(); "
            "from llama.quantize import QUANTIZERS; before = sorted(QUANTIZERS); "
            f"[importlib.import_module(m) for m in {modules!r}]; "
            "assert (torch.get_num_threads(), torch.get_default_dtype()) == (t, d), 'torch settings changed'; "
            "assert sorted(QUANTIZERS) == before == ['int4', 'int8'], sorted(QUANTIZERS)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("package", ["llama", "kollama"])
def test_no_import_cycles(package):
    """Module-level and function-level imports alike: the modules of llama, and those of kollama, form a DAG
    (``from llama import x`` of a submodule counts as an import of that submodule, not of the package)."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (ROOT / package).rglob("*.py")}
    graph = {m: set() for m in modules}
    for m, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                graph[m] |= subs or {node.module}
            elif isinstance(node, ast.Import):
                graph[m] |= {a.name for a in node.names if a.name in modules}
    if package in graph:
        graph[package] = set()  # the package's __init__ only re-exports; every import passes through it anyway
    state = {}

    def visit(m, path):
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            assert state.get(t) != "open", f"import cycle: {' -> '.join(path + [t])}"
            if t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
