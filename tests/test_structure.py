"""The shape of the code (README "Code map"): two floors, no import cycles, no import
hidden inside a function, modules one can read in a sitting, and registries that a new
score kind or retriever loss joins by itself."""

import ast
from pathlib import Path

import pytest
import torch

from src.options import Options
from src.reader import scores
from src.retriever import losses

ROOT = Path(__file__).resolve().parent.parent
MODULES = {
    ".".join(p.relative_to(ROOT).with_suffix("").parts): p
    for p in [*ROOT.glob("*.py"), *(ROOT / "src").rglob("*.py")]
    if p.name != "__init__.py"
}


def project_imports(name: str, node: ast.AST) -> list[str]:
    """Project modules an import statement in module `name` refers to."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        base = ".".join(name.split(".")[: -node.level] + ([base] if base else []))
    out = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    return out or ([base] if base in MODULES else [])


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    edges, hidden = {}, []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        edges[name] = {m for node in ast.walk(tree) for m in project_imports(name, node)} - {name}
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                hidden += [f"{path.name}:{n.lineno}" for n in ast.walk(fn) if project_imports(name, n)]
    return edges, hidden


def test_no_import_cycles_and_no_hidden_imports():
    edges, hidden = import_graph()
    assert not hidden, f"project imports inside functions: {hidden}"
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(edges[module]):
            assert state.get(dep) != 1, "import cycle: " + " → ".join([*path, module, dep])
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
    # Two floors: src never imports a script.
    assert all(dep.startswith("src.") for m, deps in edges.items() if m.startswith("src.") for dep in deps)


def test_src_modules_and_functions_are_short():
    for name, path in MODULES.items():
        if not name.startswith("src."):
            continue
        text = path.read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 500, f"{path.name}: {len(text.splitlines())} lines"
        for fn in ast.walk(ast.parse(text)):
            if isinstance(fn, ast.FunctionDef):
                assert fn.end_lineno - fn.lineno < 80, f"{path.name}:{fn.name} is {fn.end_lineno - fn.lineno} lines"


def test_comments_point_inside_the_repository():
    for path in [*MODULES.values(), *(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py")]:
        assert "SPEC" + " §" not in path.read_text(encoding="utf-8"), path


def choices(flag: str, group: str) -> list[str]:
    options = Options()
    getattr(options, group)()
    action = next(a for a in options.parser._actions if flag in a.option_strings)
    return list(action.choices)


def test_a_new_loss_or_score_kind_joins_its_flag_by_itself():
    assert choices("--score_kind", "add_eval_options") == list(scores.SCORE_KINDS) != []
    assert choices("--retriever_loss", "add_retriever_options") == list(losses.LOSSES) != []

    @losses.register("test_mse")
    def mse(scores_, gold, temperature_gold=1.0, temperature_score=1.0, negative_scores=None):
        """mean squared error (a test)"""
        return ((scores_ - gold) ** 2).mean()

    @scores.register("test_uniform", "every passage scores 1 (a test)")
    def uniform(model, input_ids, attention_mask, **generate_kwargs):
        return input_ids[:, 0, :1], torch.ones(input_ids.shape[:2])

    try:
        assert "test_mse" in choices("--retriever_loss", "add_retriever_options")
        assert "test_uniform" in choices("--score_kind", "add_eval_options")
        assert losses.get_loss("test_mse")(torch.ones(1, 2), torch.zeros(1, 2)).item() == 1.0
        ids = torch.zeros(2, 3, 4, dtype=torch.long)
        assert scores.generate_with_scores(None, ids, ids, score_kind="test_uniform")[1].shape == (2, 3)
    finally:
        del losses.LOSSES["test_mse"], scores.SCORE_KINDS["test_uniform"]
    with pytest.raises(ValueError, match="unknown retriever loss"):
        losses.get_loss("test_mse")
