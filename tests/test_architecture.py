"""The rules of docs/architecture.md, checked on the source: which module may import which.

Imports are read with :mod:`ast` from the files (no module is imported), so a rule that breaks
shows here even where the import would be lazy at run time. Two kinds of import are told
apart:

* *module-level* imports run when the module is imported (including those of every package
  ``__init__`` on the way, as Python runs them); a module is torch-free when the closure of
  its module-level imports holds no ``torch``;
* *any* import is one anywhere in the file (inside a function too): the layer rules count
  these, since a lazy import is still a dependency. ``if TYPE_CHECKING:`` blocks count for
  neither.

When a rule fails, the message names the module, the import and the rule; fix the import (or,
if the design has really changed, the page and this test together).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gpuengine"
PAGE = ROOT / "docs" / "architecture.md"


@dataclass
class Module:
    name: str
    """Dotted name, e.g. ``gpuengine.store.writer``."""
    path: Path
    top: set[str] = field(default_factory=set)
    """Modules imported at module level (absolute dotted names)."""
    anywhere: set[str] = field(default_factory=set)
    """Modules imported anywhere in the file."""

    @property
    def relpath(self) -> str:
        """The path under gpuengine/, as docs/architecture.md names it."""
        return self.path.relative_to(PACKAGE).as_posix()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(node: ast.AST, package: str, module_level: bool, out_top: set, out_any: set):
    """Walk ``node``; module-level means not inside a function or class body."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for sub in child.orelse:
                _imports(ast.Module(body=[sub], type_ignores=[]), package, module_level,
                         out_top, out_any)
            continue
        names: list[str] = []
        if isinstance(child, ast.Import):
            names = [alias.name for alias in child.names]
        elif isinstance(child, ast.ImportFrom):
            if child.level:
                base = package.split(".")
                base = base[:len(base) - (child.level - 1)]
                prefix = ".".join(base + ([child.module] if child.module else []))
            else:
                prefix = child.module or ""
            names = [prefix]
            # ``from gpuengine.store import codec`` imports the submodule gpuengine.store.codec
            names += [f"{prefix}.{alias.name}" for alias in child.names]
        for name in names:
            out_any.add(name)
            if module_level:
                out_top.add(name)
        inner = module_level and not isinstance(
            child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
        # a class body runs at import time, but gpuengine imports nothing in one
        _imports(child, package, inner, out_top, out_any)


@cache
def modules() -> dict[str, Module]:
    """Every module of the package, with its imports (resolved to modules that exist:
    ``from gpuengine.store import codec`` names gpuengine.store.codec, ``from
    gpuengine.errors import InputError`` names gpuengine.errors)."""
    found: dict[str, Module] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        if is_init:
            parts = parts[:-1]
        name = ".".join(parts)
        package = name if is_init else ".".join(parts[:-1])
        module = Module(name, path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        _imports(tree, package, True, module.top, module.anywhere)
        found[name] = module
    for module in found.values():
        module.top = {_resolve(n, found) for n in module.top} - {module.name}
        module.anywhere = {_resolve(n, found) for n in module.anywhere} - {module.name}
    return found


def _resolve(name: str, found: dict) -> str:
    """A project name to the longest existing module it starts with; others to their
    top-level package (``torch.nn.functional`` -> ``torch``)."""
    if name.split(".")[0] != "gpuengine":
        return name.split(".")[0]
    parts = name.split(".")
    while parts and ".".join(parts) not in found:
        parts.pop()
    return ".".join(parts)


def imported_at_import(name: str) -> set[str]:
    """Everything that importing ``name`` imports (module-level imports, transitively,
    with the ``__init__`` of every package on the way)."""
    mods = modules()
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        parts = current.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages
        if current in mods:
            todo += sorted(mods[current].top)
    return seen - {name}


def project_imports(module: Module, anywhere: bool = True) -> set[str]:
    names = module.anywhere if anywhere else module.top
    return {n for n in names if n.startswith("gpuengine")}


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """``gpuengine.store`` matches the package and everything under it."""
    return any(name == p or name.startswith(p + ".") for p in patterns)


def short(name: str) -> str:
    return name.removeprefix("gpuengine.")


# ----------------------------------------------------------------------------- the page

PARAGRAPH_NAMES = re.compile(r"^((?:\*\*`[^`]+`\*\*(?:,\s*|\s+and\s+)?)+)")
LAYER_HEADING = re.compile(r"^###\s+Layer\s+(\d+)\b")


@cache
def page() -> tuple[dict[str, tuple[int, str]], list[str]]:
    """docs/architecture.md's module paragraphs: {path under gpuengine/: (layer, paragraph)},
    and the problems found reading them (a paragraph outside a layer section, a path named
    twice)."""
    found: dict[str, tuple[int, str]] = {}
    problems: list[str] = []
    layer: int | None = None
    for block in re.split(r"\n\s*\n", PAGE.read_text(encoding="utf-8")):
        text = block.strip()
        heading = LAYER_HEADING.match(text)
        if heading:
            layer = int(heading.group(1))
            continue
        if text.startswith("#"):
            layer = None if text.startswith(("# ", "## ")) else layer
            continue
        lead = PARAGRAPH_NAMES.match(text)
        if not lead:
            continue
        for path in re.findall(r"`([^`]+)`", lead.group(1)):
            if layer is None:
                problems.append(f"the paragraph of {path} is not under a '### Layer N' heading")
            elif path in found:
                problems.append(f"{path} has two paragraphs")
            else:
                found[path] = (layer, " ".join(text.split()))
    return found, problems


def page_path(module: Module) -> str | None:
    """How the page names a module: ``engine.py``, ``store/writer.py``, ``store/`` for a
    package; None for what the page need not name (the root package, ``__main__``)."""
    rel = module.relpath
    if rel in ("__init__.py", "__main__.py") or rel.endswith("/__main__.py"):
        return None
    if rel.endswith("/__init__.py"):
        return rel.removesuffix("__init__.py")
    return rel


def layer_of(name: str) -> int | None:
    """A module's layer on the page (the root package counts as layer 0: what modules take
    from it is ``__version__``)."""
    if name == "gpuengine":
        return 0
    module = modules().get(name)
    path = page_path(module) if module else None
    entry = page()[0].get(path) if path else None
    return entry[0] if entry else None


def test_every_module_has_a_paragraph_under_its_layer():
    described, problems = page()
    missing = []
    for module in modules().values():
        path = page_path(module)
        if path is not None and path not in described:
            missing.append(
                f"gpuengine/{module.relpath} has no paragraph in docs/architecture.md: add one "
                f"under its layer ('### Layer N'), starting with **`{path}`**, saying what it "
                f"owns and what it must not do")
    assert not missing, "\n".join(missing)
    assert not problems, "\n".join(problems)


def test_every_paragraph_names_a_module_that_exists_and_says_what_it_must_not_do():
    paths = {page_path(m) for m in modules().values()}
    described, _ = page()
    gone = [f"docs/architecture.md describes {p}, which is not a module of gpuengine/ "
            f"(moved or removed? update the page)" for p in described if p not in paths]
    assert not gone, "\n".join(gone)
    silent = [f"the paragraph of {p} in docs/architecture.md does not say what it must not do "
              f"('Must not …')" for p, (_, text) in described.items()
              if "must not" not in text.lower()]
    assert not silent, "\n".join(silent)


def test_every_thread_the_code_names_is_on_the_page():
    text = PAGE.read_text(encoding="utf-8")
    missing = []
    for module in modules().values():
        source = module.path.read_text(encoding="utf-8")
        for thread in re.findall(r"""name=f?["'](gpuengine-[\w{}.-]+)["']""", source):
            shown = re.sub(r"\{[^}]*\}", "N", thread)
            if shown not in text:
                missing.append(f"thread {shown} (gpuengine/{module.relpath}) is not in the "
                               f"threads picture/table of docs/architecture.md")
    assert not missing, "\n".join(missing)


# ----------------------------------------------------------------------------- the rules

def test_imports_go_to_the_same_layer_or_below():
    wrong = []
    for module in modules().values():
        mine = layer_of(module.name)
        if mine is None or module.name == "gpuengine":
            continue  # no paragraph: reported above; the root package's lazy attributes
        for name in sorted(project_imports(module)):
            theirs = layer_of(name)
            if theirs is not None and theirs > mine:
                wrong.append(f"{short(module.name)} (layer {mine}) imports {short(name)} "
                             f"(layer {theirs}): imports go to the same layer or below")
    assert not wrong, "\n".join(wrong)


STANDALONE = {"gpuengine.store": "gpuengine.store", "gpuengine.scheduler": None,
              "gpuengine.ledger": None, "gpuengine.budget": None}
"""Building blocks that import nothing of gpuengine but layer 0 (and their own package)."""


@pytest.mark.parametrize("root", sorted(STANDALONE))
def test_the_store_the_scheduler_the_ledger_and_budgets_stand_alone(root):
    own = STANDALONE[root]
    wrong = []
    for module in modules().values():
        if not matches(module.name, (root,)):
            continue
        for name in sorted(project_imports(module)):
            if layer_of(name) != 0 and not (own and matches(name, (own,))):
                wrong.append(f"{short(module.name)} imports {short(name)}: {short(root)} "
                             f"imports only layer 0" + (f" and {short(own)}/" if own else ""))
    assert not wrong, "\n".join(wrong)


WEIGHT_READERS = ("gpuengine.models.registry", "gpuengine.models.sources")
FORWARD_MAY_IMPORT = ("gpuengine.models", "gpuengine.errors", "gpuengine.vocabulary")
NOT_IN_MODELS = ("lmdb", "pynvml", "typer", "rich", "threading", "queue", "multiprocessing",
                 "concurrent", "subprocess")


def test_model_code_is_free_of_scheduling_and_io():
    wrong = []
    for module in modules().values():
        if not matches(module.name, ("gpuengine.models",)):
            continue
        for name in sorted(module.anywhere):
            if name in NOT_IN_MODELS:
                wrong.append(f"{short(module.name)} imports {name}: model code does no I/O, "
                             f"scheduling or threading")
        forward = not (module.name in WEIGHT_READERS or module.name.endswith("_weights"))
        if forward:
            for name in sorted(project_imports(module)):
                if not matches(name, FORWARD_MAY_IMPORT):
                    wrong.append(f"{short(module.name)} imports {short(name)}: forward code "
                                 f"imports only {', '.join(map(short, FORWARD_MAY_IMPORT))}")
    assert not wrong, "\n".join(wrong)


TORCH_FREE = ("gpuengine.scheduler", "gpuengine.packing", "gpuengine.planner", "gpuengine.ledger",
              "gpuengine.budget", "gpuengine.committer", "gpuengine.inputs", "gpuengine.fasta",
              "gpuengine.tokenization", "gpuengine.dna_tokenizer", "gpuengine.store",
              "gpuengine.config", "gpuengine.errors", "gpuengine.vocabulary",
              "gpuengine.records", "gpuengine.progress", "gpuengine.shards", "gpuengine.fastq",
              "gpuengine.blocks", "gpuengine.input_workers", "gpuengine.writer_process",
              "gpuengine.block_validation", "gpuengine.validation_workers")
"""Never import torch, lazily or not (a package: every module in it)."""

TORCH_FREE_AT_IMPORT = ("gpuengine", "gpuengine.cli", "gpuengine.cli_options",
                        "gpuengine.cli_store", "gpuengine.api",
                        "gpuengine.export", "gpuengine.display", "gpuengine.signals",
                        "gpuengine.daemon", "gpuengine.workflows.virnucpro.frames",
                        "gpuengine.workflows.virnucpro.outputs", "gpuengine.cli_slurm",
                        "gpuengine.slurm")
"""Import without importing torch (torch comes inside the functions that need it; a package:
every module in it)."""


def reachable(name: str) -> dict[str, str]:
    """Every module ``name`` may import, lazily or not, with the module that imports it
    ({imported: importer}); package ``__init__``s on the way included. The root package's
    lazy attributes (``gpuengine.embed``) are not followed: ``from gpuengine import
    __version__`` does not run them."""
    mods = modules()
    via: dict[str, str] = {}
    todo = [name]
    while todo:
        current = todo.pop()
        parts = current.split(".")
        nexts = [".".join(parts[:i]) for i in range(1, len(parts))]
        if current in mods:
            nexts += sorted(mods[current].top if current == "gpuengine"
                            else mods[current].anywhere)
        for nxt in nexts:
            if nxt not in via and nxt != name:
                via[nxt] = current
                todo.append(nxt)
    return via


def chain(via: dict[str, str], start: str, end: str) -> str:
    path = [end]
    while path[-1] != start:
        path.append(via[path[-1]])
    return " -> ".join(short(p) for p in reversed(path))


@pytest.mark.parametrize("root", TORCH_FREE)
def test_torch_free_modules_never_import_torch(root):
    wrong = []
    for name in modules():
        if matches(name, (root,)):
            via = reachable(name)
            if "torch" in via:
                wrong.append(f"{chain(via, name, 'torch')}: {short(root)} is torch-free")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("root", TORCH_FREE_AT_IMPORT)
def test_front_ends_import_without_torch(root):
    names = [root] if root == "gpuengine" else [n for n in modules() if matches(n, (root,))]
    wrong = [f"importing {name} imports torch (import it inside the function that needs it)"
             for name in names if "torch" in imported_at_import(name)]
    assert not wrong, "\n".join(wrong)


def test_the_planner_and_the_input_side_read_the_store_only_through_the_lookup():
    for name in ("gpuengine.planner", "gpuengine.inputs", "gpuengine.fasta", "gpuengine.fastq",
                 "gpuengine.blocks", "gpuengine.input_workers"):
        store = {n for n in project_imports(modules()[name]) if matches(n, ("gpuengine.store",))}
        assert store <= {"gpuengine.store.lookup", "gpuengine.store.codec"}, (
            f"{short(name)} imports {sorted(store)}: upstream code reads the store through "
            f"store/lookup.py only")


def test_test_modules_do_not_import_each_other():
    tests = Path(__file__).resolve().parent
    names = {p.stem for p in tests.glob("test_*.py")}
    wrong = []
    for path in sorted(tests.glob("*.py")):
        top: set[str] = set()
        anywhere: set[str] = set()
        _imports(ast.parse(path.read_text(encoding="utf-8")), "", True, top, anywhere)
        for name in sorted({n.split(".")[0] for n in anywhere}):
            if name in names and name != path.stem:
                wrong.append(f"tests/{path.name} imports {name}: shared helpers go in "
                             f"tests/conftest.py or a helper module that is not a test module")
    assert not wrong, "\n".join(wrong)


SHARED_WORDS = ("PRECISIONS", "PRECISION_DTYPES", "PRECISION_BYTES", "POOLS", "STORE_DTYPES",
                "DEFAULT_TABLE", "TABLE_NAME", "utc_now", "is_table_name", "check_table_name")


def test_the_shared_words_are_defined_once_in_the_vocabulary():
    wrong = []
    for module in modules().values():
        if module.name == "gpuengine.vocabulary":
            continue
        tree = ast.parse(module.path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
            else:
                continue
            wrong += [f"{short(module.name)} defines {name}: import it from gpuengine.vocabulary"
                      for name in names if name in SHARED_WORDS]
    assert not wrong, "\n".join(wrong)


def test_every_test_helper_module_is_listed_in_conftest():
    tests = Path(__file__).resolve().parent
    listed = ast.get_docstring(ast.parse((tests / "conftest.py").read_text(encoding="utf-8")))
    missing = [f"tests/{path.name} is a helper module missing from conftest.py's docstring "
               f"(add ``{path.name}``: what it holds)" for path in sorted(tests.glob("*.py"))
               if not path.name.startswith("test_") and path.name != "conftest.py"
               and f"``{path.name}``" not in (listed or "")]
    assert not missing, "\n".join(missing)
