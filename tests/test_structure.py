"""The shape of the package (docs/design.md §1): a stage imports only from the stages before it, and modules and
classes stay small enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "talm"
STAGES = ["tokenizer", "data", "model", "eval", "train", "use"]
LEAVES = ["errors", "files", "config"]  # in this order: each may import only the ones before it
MODULES = sorted(SRC.rglob("*.py"))


def talm_imports(path: Path) -> list[str]:
    """Every talm module `path` imports, at any depth (function-level imports count too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "talm":
            out.append(node.module)
            if node.module == "talm":
                out += [f"talm.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "talm"]
    return out


def part_of(module: str) -> str:
    """The stage or leaf a dotted module belongs to ("talm.train.loop" -> "train")."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "talm"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_a_stage_imports_only_from_earlier_stages(path: Path) -> None:
    here = path.relative_to(SRC).parts
    owner = here[0] if len(here) > 1 else path.stem
    if owner in ("cli", "__init__"):
        return  # the console scripts and the lazy public API may use every stage
    allowed = LEAVES[: LEAVES.index(owner)] if owner in LEAVES else LEAVES + STAGES[: STAGES.index(owner) + 1]
    wrong = [m for m in talm_imports(path) if part_of(m) not in allowed]
    assert not wrong, f"{path.relative_to(SRC)} ({owner}) imports {wrong}: only {allowed} may be imported"


def own_lines(node: ast.AST) -> int:
    """A function's lines less those of the functions and classes defined inside it (each is measured alone)."""
    size = node.end_lineno - node.lineno + 1
    for inner in ast.walk(node):
        if inner is not node and isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            size -= inner.end_lineno - inner.lineno + 1
    return size


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_functions_stay_short(path: Path) -> None:
    """A module holds one idea however long it is; its functions stay short enough to read at once."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            size = own_lines(node)
            assert size <= 80, (
                f"{node.name} in {path.relative_to(SRC)} has {size} lines of its own (at most 80)"
            )


def test_every_module_is_in_the_design_docs_module_map() -> None:
    text = (SRC.parents[1] / "docs" / "design.md").read_text(encoding="utf-8")
    table = text[text.index("## 5. Module map") :]
    missing = [
        str(p.relative_to(SRC))
        for p in MODULES
        if p.parent.name != "cli"
        and not (p.name == "__init__.py" and p.parent != SRC)
        and f"`{p.relative_to(SRC)}`" not in table
    ]
    assert not missing, f"docs/design.md §5 does not list {missing}: add a line saying each one's job"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """talm module -> the talm modules it imports, at any depth and under TYPE_CHECKING too (`from talm.train
    import dist` is an edge to talm.train.dist when that is a module)."""
    known = {module_name(p) for p in MODULES}
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "talm":
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
                edges |= set(subs) if len(subs) == len(node.names) else {node.module, *subs}
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in known}
        graph[module_name(path)] = {e for e in edges if e in known} - {module_name(path)}
    return graph


def test_no_import_cycles() -> None:
    """No module imports one that imports it back, directly or around a loop (type-only imports included):
    data flows one way, so each module can be read knowing only what it imports."""
    graph, index, low, stack, on_stack, cycles = import_graph(), {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def attribute_writes(path: Path) -> list[str]:
    """`name.attr = ...` (or +=) in a function where `name` is one of its parameters other than self and cls,
    and `self.part.attr = ...` outside `__init__` (an object setting up its own parts may)."""
    found = []
    for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        args = fn.args
        params = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs} - {"self", "cls"}
        for node in ast.walk(fn):
            targets = node.targets if isinstance(node, ast.Assign) else []
            targets = [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else targets
            flat = [
                t for target in targets for t in (target.elts if isinstance(target, ast.Tuple) else [target])
            ]
            for t in flat:
                while isinstance(t, ast.Attribute) and isinstance(t.value, ast.Attribute):
                    t = t.value  # cfg.model.vocab_size writes cfg's
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in params:
                    found.append(f"{fn.name}: {t.value.id}.{t.attr} (line {node.lineno})")
                part = t.value if isinstance(t, ast.Attribute) else None
                if (
                    isinstance(part, ast.Attribute) and isinstance(part.value, ast.Name)
                    and part.value.id == "self" and fn.name != "__init__"
                ):  # fmt: skip
                    found.append(f"{fn.name}: self.{part.attr}.{t.attr} (line {node.lineno})")
    return found


# Settings are data, not objects with state: a run's resolution fills them in before anything is built.
CONFIG_PARAMS = {"cfg"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_an_object_s_state_is_written_by_that_object_only(path: Path) -> None:
    """No function sets attributes of an object passed to it (it calls that object's methods instead), so a
    reader finds every change of an object's state in its own class."""
    wrong = [w for w in attribute_writes(path) if w.split(": ")[1].split(".")[0] not in CONFIG_PARAMS]
    assert not wrong, f"{path.relative_to(SRC)} writes another object's attributes: {wrong}"
