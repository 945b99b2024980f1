"""The layering of ldm/: no import circle, and the rooms that alone may import mlflow,
accelerate and read Hydra's config."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

LDM = Path(__file__).resolve().parents[2] / "ldm"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(LDM.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: Set[str], typing: bool = False) -> Set[str]:
    """Return the ldm modules `path` imports anywhere (top level or inside a function); with
    `typing`, also those imported under `if TYPE_CHECKING:` only."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    # imports under `if TYPE_CHECKING:` never run, so they are no edge of the import graph
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", "")) == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}
    found: Set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only and not typing:
            continue
        names: List[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] +
                                ([base] if base else []))
            # `from ldm import tracking` imports the module ldm.tracking
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                     for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("ldm"):
                found.add(name)
    found.discard(module_name(path))
    return found


def import_graph(typing: bool = False) -> Dict[str, Set[str]]:
    files = {module_name(p): p for p in LDM.rglob("*.py")}
    modules = set(files)
    # a package's __init__ running is part of importing any of its modules, not an edge of ours
    return {m: {d for d in imports_of(p, modules, typing) if not m.startswith(d + ".")}
            for m, p in files.items()}


def reachable(graph: Dict[str, Set[str]], start: str) -> Set[str]:
    """Return every module that importing `start` imports, directly or through others."""
    seen: Set[str] = set()
    todo = [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """Return one import circle as [a, b, ..., a], or [] when there is none."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_no_module_of_ldm_imports_one_that_imports_it():
    cycle = find_cycle(import_graph())
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_the_training_modules_form_no_circle_even_in_type_hints_and_never_import_the_config():
    # ldm.config registers Hydra's schemas when imported: the loop takes plain values
    graph = import_graph(typing=True)
    train = {m: deps & {d for d in graph if d.startswith("ldm.train")}
             for m, deps in graph.items() if m.startswith("ldm.train")}
    cycle = find_cycle(train)
    assert not cycle, "import circle in ldm/train: " + " -> ".join(cycle)
    for module in train:
        assert "ldm.config" not in reachable(graph, module), f"{module} imports ldm.config"


def test_the_cycle_finder_finds_a_circle_through_three_modules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_only_the_tracking_modules_import_mlflow_and_only_train_imports_accelerate():
    for path in LDM.rglob("*.py"):
        text = path.read_text()
        name = module_name(path)
        if "import mlflow" in text or "from mlflow" in text:
            assert name in ("ldm.tracking", "ldm.runs"), f"{name} imports mlflow"
        if "import accelerate" in text or "from accelerate" in text:
            assert name.startswith("ldm.train"), f"{name} imports accelerate"


def task_modules() -> Set[str]:
    """Return the modules of the tasks `ldm.tasks.TASKS` names (read from its source)."""
    tree = ast.parse((LDM / "tasks" / "__init__.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "TASKS" for t in node.targets):
            return {f"ldm.tasks.{name}" for name in ast.literal_eval(node.value)}
    raise AssertionError("ldm/tasks/__init__.py defines no TASKS")


def test_no_module_of_ldm_tasks_imports_a_task_module():
    # what tasks share lives in modules of their own (common, prepared, checkpoints, ...)
    tasks = task_modules()
    assert {"ldm.tasks.prepare", "ldm.tasks.evaluate", "ldm.tasks.chain"} <= tasks
    for module, deps in import_graph().items():
        if module.startswith("ldm.tasks"):
            wrong = sorted((deps & tasks) - {module})
            assert not wrong, f"{module} imports the task module(s) {', '.join(wrong)}"
