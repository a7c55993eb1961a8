"""The README's "Your own training loop" recipe runs as written (so it cannot go stale): a
model class of the user's, their DataLoader, optimizer and schedule, S2HTrainer, export."""

import re
import sys
import types
from pathlib import Path

import torch

from s2hpruner import count_flops

README = Path(__file__).resolve().parents[1] / "README.md"


def recipe() -> str:
    text = README.read_text()
    section = text.split("## Your own training loop", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def test_readme_recipe_runs_and_meets_its_budget(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("readme_recipe")  # a real module, so the model pickles
    monkeypatch.setitem(sys.modules, "readme_recipe", module)
    scope = module.__dict__
    exec(compile(recipe(), str(README), "exec"), scope)  # noqa: S102
    model, pruned, x = scope["model"], scope["pruned"], scope["x"]
    assert "Net" in scope and scope["Net"].__module__ == "readme_recipe"  # not the registry
    flops = count_flops(pruned, x[:1]) / count_flops(model, x[:1])
    assert abs(flops - 0.5) <= 0.01, flops
    assert scope["top1"] >= 90.0, scope["top1"]  # the README says "about 95%"
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert torch.load(tmp_path / "pruned.pt", weights_only=False)(x[:2]).shape == (2, 10)
    out = capsys.readouterr().out
    assert "FLOPs ratio" in out
    print(out)


def test_recipe_is_short_and_complete():
    code = recipe()
    assert len(code.strip().splitlines()) <= 50
    for step in ("class Net(nn.Module)", "DataLoader(", "torch.optim.SGD(", "S2HTrainer(",
                 "trainer.step(", "scheduler.step()", "trainer.export()", "torch.save("):
        assert step in code, step


def test_every_repository_file_the_readme_names_is_in_the_repository():
    """A clone has only what the repository holds: a path the README names under one of its
    folders (or outside it, `../`) would send a reader nowhere."""
    root = README.parent
    named = set(re.findall(r"`([^`\s]+)`", README.read_text()))
    folders = ("app/", "core/", "benchmarks/", "configs/", "docs/", "scripts/", "src/", "tests/")
    paths = [t for t in named if t.startswith(folders) or t.startswith("../")]
    assert len(paths) > 20  # the module table and the benchmark files are named
    missing = [p for p in paths
               if not any((base / p).exists() for base in (root, root / "src/s2hpruner"))]
    assert not missing, f"README names files the repository does not have: {missing}"
