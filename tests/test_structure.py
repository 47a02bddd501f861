"""The shape of the code (README "Code map"): two floors, no import cycles, no import
hidden inside a function, modules one can read in a sitting, src code that never writes
into the argparse options, a training loop free of readers, retrievers and FAISS, names
that do not collide, and registries that a new score kind or retriever loss joins by
itself. Everything here reads the source once (ast), so the whole file takes a second."""

import ast
import functools
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
SRC_MODULE_LINES = 450
SCRIPT_LINES = 300
FUNCTION_LINES = 80
SCRIPT_LINES_EXEMPT: set[str] = set()  # keep it empty: thin the script instead
# The training loop's rooms: they may not reach a reader, a retriever, the corpus or FAISS.
TRAIN_FORBIDDEN = ("src.reader", "src.retriever", "src.corpus", "faiss")
# The names argparse namespaces go by; src code reads them (src/options.py parses them,
# src/configs.py builds the typed configs from them, in one place) but never writes into them.
OPTION_NAMES = {"opt", "args", "options"}


@functools.cache
def tree(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(encoding="utf-8"))


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


def external_imports(node: ast.AST) -> list[str]:
    """Top-level names of the third-party packages an import statement brings in."""
    if isinstance(node, ast.Import):
        return [a.name.split(".")[0] for a in node.names if a.name.split(".")[0] != "src"]
    if isinstance(node, ast.ImportFrom) and not node.level and node.module and node.module.split(".")[0] != "src":
        return [node.module.split(".")[0]]
    return []


@functools.cache
def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]], list[str]]:
    """(project edges, third-party packages imported directly, imports hidden in functions)."""
    edges, external, hidden = {}, {}, []
    for name, path in MODULES.items():
        nodes = list(ast.walk(tree(name)))
        edges[name] = {m for node in nodes for m in project_imports(name, node)} - {name}
        external[name] = {m for node in nodes for m in external_imports(node)}
        for fn in nodes:
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                hidden += [f"{path.name}:{n.lineno}" for n in ast.walk(fn) if project_imports(name, n)]
    return edges, external, hidden


def reachable(module: str) -> set[str]:
    """Every project module `module` imports, directly or through others (itself included)."""
    edges, seen, todo = import_graph()[0], set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += edges[m]
    return seen


def test_no_import_cycles_and_no_hidden_imports():
    edges, _, hidden = import_graph()
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


def test_the_training_loop_knows_no_reader_retriever_corpus_or_faiss():
    _, external, _ = import_graph()
    for name in MODULES:
        if not name.startswith("src.train."):
            continue
        modules = reachable(name)
        reached = modules | {pkg for m in modules for pkg in external[m]}
        bad = sorted(m for m in reached if any(m == f or m.startswith(f + ".") for f in TRAIN_FORBIDDEN))
        assert not bad, f"{name} imports (directly or through others) {bad}"


def test_modules_scripts_and_functions_are_short():
    too_long = []
    for name, path in MODULES.items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if name.startswith("src.") and lines > SRC_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines (src modules: at most {SRC_MODULE_LINES})")
        if "." not in name and name not in SCRIPT_LINES_EXEMPT and lines > SCRIPT_LINES:
            too_long.append(f"{path.name}: {lines} lines (scripts: at most {SCRIPT_LINES})")
        for fn in ast.walk(tree(name)) if name not in SCRIPT_LINES_EXEMPT else ():
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = fn.end_lineno - fn.lineno + 1
                if n > FUNCTION_LINES:
                    too_long.append(
                        f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}: {n} lines (at most {FUNCTION_LINES})"
                    )
    assert not too_long, "\n".join(too_long)


def option_writes(module: ast.Module, where: str) -> list[str]:
    """Places in `module` (the file `where`) that write into an options namespace or read one
    with a fallback: `opt.x = ...` (also augmented, annotated, deleted, and inside tuple
    targets), `setattr(opt, ...)`, `delattr(opt, ...)`, `getattr(opt, ...)`."""
    found = []

    def targets(node: ast.AST) -> list[ast.AST]:
        if isinstance(node, (ast.Tuple, ast.List)):
            return [t for elt in node.elts for t in targets(elt)]
        return [node.value if isinstance(node, ast.Starred) else node]

    def is_options(node: ast.AST) -> bool:
        return isinstance(node, ast.Name) and node.id in OPTION_NAMES

    for node in ast.walk(module):
        written = []
        if isinstance(node, ast.Assign):
            written = [t for target in node.targets for t in targets(target)]
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            written = [node.target]
        elif isinstance(node, ast.Delete):
            written = node.targets
        for target in written:
            if isinstance(target, (ast.Attribute, ast.Subscript)) and is_options(target.value):
                found.append(f"{where}:{node.lineno} writes {ast.unparse(target)}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "delattr")
            and node.args
            and is_options(node.args[0])
        ):
            found.append(f"{where}:{node.lineno} {ast.unparse(node)}")
    return found


def test_src_never_writes_into_the_options():
    # src/options.py parses the namespace and src/configs.py turns it into typed configs.
    found = [
        f
        for name, path in MODULES.items()
        if name.startswith("src.") and name not in ("src.options", "src.configs")
        for f in option_writes(tree(name), str(path.relative_to(ROOT)))
    ]
    assert not found, "src code touching the argparse options (take a typed config instead):\n" + "\n".join(found)


def test_no_two_neighbours_share_a_stem():
    """retriever.py beside retriever_model.py, or data/ beside data_utils.py, reads as one
    thing split in two: a newcomer cannot tell which holds what."""
    clashes = []
    for directory in [ROOT, *(p for p in (ROOT / "src").rglob("*") if p.is_dir() and p.name != "__pycache__")]:
        names = sorted(
            p.stem if p.is_file() else p.name
            for p in directory.iterdir()
            if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").exists())
        )
        clashes += [f"{directory.relative_to(ROOT)}: {a} / {b}" for a, b in stem_clashes(names)]
    assert not clashes, clashes


def stem_clashes(names: list[str]) -> list[tuple[str, str]]:
    """Pairs of sorted `names` where one is a prefix of the other."""
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1 :] if b.startswith(a)]


def test_the_rules_catch_what_they_forbid():
    source = """
def f(opt, args, options, config):
    opt.rank = 0
    args.device, x = "cpu", 1
    options.given |= {"x": "--x"}
    setattr(opt, "is_main", True)
    getattr(args, "n_lists", 1024)
    del opt.local_rank
    config.rank = 0  # a typed object of its own: fine
    y = opt.rank  # reading a flag: fine
"""
    found = option_writes(ast.parse(source), "m.py")
    assert sorted(f.split(" ", 1)[0] for f in found) == ["m.py:3", "m.py:4", "m.py:5", "m.py:6", "m.py:7", "m.py:8"]
    assert stem_clashes(sorted(["retrieval", "retriever", "retriever_model", "model"])) == [
        ("retriever", "retriever_model")
    ]
    assert project_imports("src.train.trainer", ast.parse("from ..reader import model").body[0]) == ["src.reader.model"]


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
