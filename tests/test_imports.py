"""No import cycle among zeropad's modules: every `import zeropad...` (at the top of a module or inside a
function, where cycles hide) read from the source, and the graph they draw must be acyclic. A cycle makes the
import order matter, and a late import inside a function is how one is usually papered over."""

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the zeropad modules it imports. `from zeropad.model import attention` imports the module
    zeropad.model.attention; `from zeropad.model.load import build_model` imports zeropad.model.load."""
    modules = {module_name(p): p for p in (SRC / "zeropad").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                submodules = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                imported |= submodules or {node.module}
        graph[name] = imported - {name}
    return graph


def test_the_graph_sees_late_imports():
    graph = import_graph()
    assert "zeropad.train.loop" in graph["zeropad.cli"]  # imported inside the train command
    assert "zeropad.model.attention" in graph["zeropad.model.load"]  # `from zeropad.model import attention`


def test_zeropad_modules_import_without_cycles():
    try:
        order = list(TopologicalSorter(import_graph()).static_order())
    except CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")
    assert order.index("zeropad.model.checkpointing") < order.index("zeropad.plan.arch")


def test_a_cycle_is_found():
    """The negative control: the checker reports a cycle drawn into the graph."""
    graph = import_graph()
    graph["zeropad.model.checkpointing"].add("zeropad.plan.fit")  # what checkpointing once imported
    with pytest.raises(CycleError):
        list(TopologicalSorter(graph).static_order())


def test_data_never_imports_model_and_model_never_imports_verify():
    """DESIGN's layering: the per-family facts (zeropad.family) sit below data/ and model/, so data and the packer
    never reach into model/ (or the trainer), and model/ does not depend on the exactness harness that checks it."""
    below = ("zeropad.data", "zeropad.pack", "zeropad.family")
    for name, imported in import_graph().items():
        if name.startswith(below):
            assert not {m for m in imported if m.startswith(("zeropad.model", "zeropad.train", "zeropad.verify"))}, name
        if name.startswith("zeropad.model"):
            assert "zeropad.verify" not in imported, name
