"""The layout's rules, checked from the source: no import circles, one lifecycle, one writer per table.

Every import statement counts, lazy ones inside functions included: a circle of lazy imports is
still a circle a reader has to untangle. The package's own `__init__` (it exposes the Celery
app) is left out, as `from marketplace.x import y` goes through it without depending on it.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("marketplace", "api", "workers")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if rel.parts[:2] == ("marketplace", "pb") or "migrations" in rel.parts:
                continue
            name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            out[name] = path
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for target in targets:
                found = resolve(target)
                if found and found not in (module, "marketplace"):
                    graph[module].add(found)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    import sys

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_one_that_imports_it_back():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_marketplace_never_imports_the_doors_above_it():
    graph = _graph()
    wrong = {(m, t) for m, targets in graph.items() if m.startswith("marketplace")
             for t in targets if t.split(".")[0] in ("api", "workers")}
    assert wrong == set()


_STATUS_SQL = re.compile(r"UPDATE\s+(?:tasks|subtasks)\s+SET\s[^;]*?\bstatus\s*=", re.S | re.I)


def _writes_a_status(path: Path) -> bool:
    """An `UPDATE tasks|subtasks SET ... status =` statement, or an assignment to an object's `.status`."""
    source = path.read_text()
    if _STATUS_SQL.search(source):
        return True
    statuses = {"Created", "Scheduled", "InProgress", "Done", "Failed", "Cancelled", "Pending", "Running"}

    def a_status(value: ast.AST) -> bool:
        return any((isinstance(n, ast.Constant) and n.value in statuses)
                   or (isinstance(n, ast.Name) and n.id in ("TaskStatus", "SubTaskStatus"))
                   for n in ast.walk(value))

    return any(isinstance(node, ast.Assign) and a_status(node.value)
               and any(isinstance(t, ast.Attribute) and t.attr == "status" for t in node.targets)
               for node in ast.walk(ast.parse(source)))


def test_only_the_lifecycle_writes_a_task_or_subtask_status():
    writers = {str(path.relative_to(ROOT)) for path in _modules().values() if _writes_a_status(path)}
    allowed = {
        "marketplace/tasks/lifecycle/statements.py", "marketplace/tasks/lifecycle/ends.py",
        # What recovery closes: subtasks a task that ended left open (no door runs for a dead node).
        "marketplace/scheduling/recovery.py",
        "marketplace/events/codec.py",  # a Kafka message's field, not a row
    }
    assert writers <= allowed, writers - allowed


def _inserters(table: str) -> set[str]:
    pattern = re.compile(rf"INSERT INTO {table}\b|insert\((?:\w+\.)?{_MODEL[table]}\b|pg_insert\({_MODEL[table]}\b")
    return {str(p.relative_to(ROOT)) for p in _modules().values() if pattern.search(p.read_text())}


_MODEL = {"outbox_events": "OutboxEvent", "audit_pending": "AuditPending", "ledger_entries": "LedgerEntry",
          "holds": "Hold"}


def test_each_domain_alone_inserts_into_its_tables():
    assert _inserters("outbox_events") <= {"marketplace/events/outbox.py", "marketplace/events/payloads.py"}
    assert _inserters("audit_pending") <= {"marketplace/audit/service.py"}
    assert _inserters("ledger_entries") <= {"marketplace/billing/service.py", "marketplace/billing/charges.py"}
    assert _inserters("holds") <= {"marketplace/billing/service.py"}


def test_the_architecture_documents_moves_are_the_lifecycles():
    from marketplace.tasks.lifecycle.moves import SUBTASK_MOVES, TASK_MOVES

    doc = (ROOT / "docs" / "architecture.md").read_text()
    rows = set(re.findall(r"^\| (\w+) \| (\w+) \| `(\w+)`", doc, re.M))
    table = {(a.value, b.value, door) for (a, b), door in {**TASK_MOVES, **SUBTASK_MOVES}.items()}
    assert rows == table
