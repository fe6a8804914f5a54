"""The folder tree is the architecture: imports point one way, modules stay readable, recipes stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline"
# experiments -> training / export / evaluation -> model, data -> recipe; the top-level modules below every stage
RANK = {"recipe": 1, "data": 2, "model": 2, "training": 3, "export": 3, "evaluation": 3, "experiments": 4}
BASE = {"errors", "storage", "run_folder"}
MAX_LINES = 400


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            names += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.startswith("pipeline")]
    return names


def _stage(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_imports_point_one_way():
    wrong = []
    for path in PIPELINE.rglob("*.py"):
        rel = path.relative_to(PIPELINE)
        own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for name in _imports(path):
            target = _stage(name)
            if own in BASE:
                ok = target in BASE
            elif own in RANK:
                ok = target in BASE or target == own or RANK.get(target, 99) < RANK[own]
            else:  # cli.py, __main__.py: the top
                ok = True
            if not ok:
                wrong.append(f"pipeline/{rel} imports {name}")
    assert wrong == []


def test_no_module_over_400_lines():
    long = {
        str(p.relative_to(PIPELINE)): n
        for p in PIPELINE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}


def test_only_the_unsloth_module_imports_unsloth():
    importers = [
        str(p.relative_to(PIPELINE))
        for p in PIPELINE.rglob("*.py")
        if any(
            isinstance(n, (ast.Import, ast.ImportFrom)) and "unsloth" in ast.unparse(n).split()[1]
            for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
        )
    ]
    assert importers == ["model/unsloth.py"]


def test_recipes_and_the_cli_import_no_torch():
    code = (
        "import sys, pipeline.cli, pipeline.recipe as r; r.validate(r.load_recipe('dpo_qlora')); "
        "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
