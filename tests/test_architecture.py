"""The layout rules of docs/architecture.md, checked on the source."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_vae"

# the data path, lowest layer first: a module may import from its own layer or below
LAYERS = [
    {"errors", "files", "seeds", "arviz_compat", "registry", "progress", "onednn"},
    {"config"},
    {"data", "data.sources", "data.batching"},
    {"distributions"},
    {"likelihoods", "networks", "priors", "flows"},
    {"model", "semisupervised"},
    {"models"},
    {"objective", "estimators", "latents"},
    {"tracking"},
    {"runner", "runner.resolve", "runner.state", "runner.signals", "runner.distributed",
     "runner.threads", "runner.allocator", "runner.compiling"},
    {"runner.step"},
    {"runner.rundir"},
    {"runner.train"},
    {"plots", "diagnostics", "calibration", "export"},
    {"commands"},
    {"cli", "__main__", "__init__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def package_imports(path: Path):
    """(imported pyro_vae module, line, at module level?) for each import of the package."""
    name = module_name(path)
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if path.name == "__init__.py" and path.parent == PACKAGE:
        package = []
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` imports are module level, never run
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            top_level |= {id(inner) for inner in node.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[: len(package) - (node.level - 1)]
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            targets = [target] if node.module else [f"{target}.{a.name}".strip(".")
                                                    for a in node.names]
            for t in targets:
                yield t or "__init__", node.lineno, id(node) in top_level
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pyro_vae"):
            yield node.module.removeprefix("pyro_vae").strip(".") or "__init__", node.lineno, \
                id(node) in top_level


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    assert {module_name(p) for p in MODULES} - set(LAYER) == set()


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_no_module_imports_from_later_in_the_data_path(path):
    me = LAYER[module_name(path)]
    for target, line, top in package_imports(path):
        while target not in LAYER:  # a name inside a module (or the package's __init__)
            target = target.rsplit(".", 1)[0] if "." in target else "__init__"
        assert LAYER[target] <= me, f"{path.name}:{line} imports {target}, later in the path"
        # the entry point imports the tool inside run(), where it can catch a Ctrl-C
        assert top or module_name(path) == "__main__", \
            f"{path.name}:{line} imports {target} inside a function"


def test_exactly_one_backward_call_in_the_package():
    calls = [(p.name, i) for p in MODULES
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"\.backward\(", line)]
    assert len(calls) == 1 and calls[0][0] == "step.py", calls


@pytest.mark.parametrize("path", [p for p in MODULES if p.name not in ("cli.py", "__main__.py")],
                         ids=module_name)
def test_library_code_never_prints_and_never_names_a_flag(path):
    text = path.read_text()
    assert not re.search(r"^\s*print\(", text, re.M), f"{path.name} prints"
    for line in text.splitlines():
        if '"' in line or "'" in line:  # strings: messages and log lines
            flags = re.findall(r"""["' (]--[a-z][a-z-]+""", line)
            assert not flags, f"{path.name}: {line.strip()}"
