"""The package's layers (docs/architecture.md): no module imports a higher layer, compress and export never import
each other, and no import circle between hpedge's modules (imports inside functions included)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "hpedge"
LAYERS = [  # lowest first; a module may import its own layer and those below
    ("hpedge.errors", "hpedge.io"),
    ("hpedge.models", "hpedge.prompts"),
    ("hpedge.backends", "hpedge.targets", "hpedge.evaluation", "hpedge.testing"),
    ("hpedge.runtime", "hpedge.zoo"),
    ("hpedge.compress", "hpedge.export"),
    ("hpedge.cli", "hpedge.console"),
]
APART = [("hpedge.compress", "hpedge.export")]


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hpedge"):
                for a in node.names:  # `from hpedge.export import build` names a module
                    found.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("hpedge")}
        out[name] = {m for m in found if m in modules and m != name}
    return out


def _layer(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in layer):
            return i
    return -1


def test_every_module_has_a_layer() -> None:
    assert [m for m in _imports() if m != "hpedge" and _layer(m) < 0] == []


def test_no_module_imports_a_higher_layer_and_compress_and_export_stay_apart() -> None:
    bad = [(m, i) for m, deps in _imports().items() for i in deps if m != "hpedge" and _layer(i) > _layer(m)]
    bad += [(m, i) for m, deps in _imports().items() for i in deps for a, b in APART
            if (m.startswith(a) and i.startswith(b)) or (m.startswith(b) and i.startswith(a))]
    assert bad == []


def test_no_import_circle() -> None:
    graph = _imports()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            assert visit(m) is None
