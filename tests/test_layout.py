"""The package's shape: the core never imports the application, ``import s2hpruner`` loads
the core only, and every config field is read by the application."""

import ast
import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import s2hpruner
from s2hpruner.app.config import RunConfig

SRC = Path(s2hpruner.__file__).resolve().parent


def _imports(path: Path) -> list[str]:
    """Absolute names of everything a module imports (relative imports resolved)."""
    package = ".".join(("s2hpruner", *path.relative_to(SRC).parent.parts))
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return names


def test_core_never_imports_the_application():
    core_files = sorted((SRC / "core").rglob("*.py"))
    assert len(core_files) >= 10
    for path in core_files:
        for name in _imports(path):
            assert not name.startswith(("s2hpruner.app", "benchmarks")), (path, name)
            assert name != "s2hpruner" or path.name == "__init__.py", (path, name)


def test_the_application_does_not_import_benchmarks():
    for path in sorted((SRC / "app").rglob("*.py")):
        assert not any(n.startswith("benchmarks") for n in _imports(path)), path


def test_import_s2hpruner_loads_no_application_module():
    code = (
        "import sys, s2hpruner; "
        "print(sorted(m for m in sys.modules if m.startswith('s2hpruner.app')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    for name in ("S2HPruner", "S2HTrainer", "count_flops", "Method", "METHODS"):
        assert hasattr(s2hpruner, name)


def _attributes_read(tree: ast.AST, owner: str) -> set[str]:
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == owner
        and isinstance(node.ctx, ast.Load)
    }


def test_every_config_field_is_used():
    """A field the run never reads is a promise the tool does not keep: every field is read
    as ``cfg.<field>`` by the application (or by the config's own budgets/phases)."""
    read = set()
    for path in (SRC / "app").glob("*.py"):
        if path.name != "config.py":
            read |= _attributes_read(ast.parse(path.read_text()), "cfg")
    for method in (RunConfig.budgets, RunConfig.phase_fractions):
        source = inspect.cleandoc("\n" + inspect.getsource(method))
        read |= _attributes_read(ast.parse(source), "self")
    unused = sorted({f.name for f in dataclasses.fields(RunConfig)} - read)
    assert unused == []
