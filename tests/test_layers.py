"""The package's import structure: modules import only their own layer or the layers below, and no
import cycle exists anywhere (function-level imports included; `if TYPE_CHECKING:` ones are not run)."""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "modelpress"

# lowest first; a name is a module or a package (all its modules). A new module must be placed here.
LAYERS = [
    {"errors", "safe_yaml", "presets", "capabilities"},
    {"batches", "context", "stage", "state", "sweep"},
    {"format", "runtime", "graph", "measure", "report", "surgery", "forms", "keras_model"},
    {"techniques"},
    {"recipe"},
    {"pipeline", "sequential"},
    {"api", "export", "export_hf", "export_gguf", "html"},
    {"compare", "data"},
    {"auto"},
    {"cli"},
    {"__init__"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    head = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if module in names or head in names:
            return i
    raise AssertionError(f"module {module!r} is in no layer: add it to LAYERS in {__file__}")


def _imports(module: str) -> set[str]:
    """The modelpress modules `module` imports, wherever in the file, except under `if TYPE_CHECKING:`."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module.split(".")[:-1]  # `from . import` is relative to the containing package
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "modelpress":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                sub = ".".join(target + [alias.name])
                is_module = sub in MODULES or f"{sub}.__init__" in MODULES
                found.add(sub if is_module else ".".join(target) or "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "modelpress":
                    found.add(".".join(alias.name.split(".")[1:]) or "__init__")
    return {m if m in MODULES else f"{m}.__init__" for m in found} - {module}


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        _layer(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    up = sorted(t for t in GRAPH[module] if _layer(t) > _layer(module))
    assert not up, f"{module} (layer {_layer(module)}) imports from a higher layer: {up}"


def test_no_import_cycles():
    # Tarjan's strongly connected components; package __init__ files that only gather their own
    # submodules (a registry) are followed like any module
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(GRAPH):
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_function_level_imports():
    assert "pipeline" in GRAPH["api"] and "stage" in GRAPH["pipeline"]
    assert "html" in GRAPH["compare"] and "compare" not in GRAPH["html"]
