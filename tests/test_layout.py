"""The package's layout: which of its modules import which, read from the source with ``ast``.

Imports inside functions count as much as those at the top of a module: a cycle through a
function-level import is still a cycle, only one that fails later and more rarely.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dask_pconv

ROOT = Path(dask_pconv.__file__).parent
PACKAGE = "dask_pconv"


def _modules():
    """Module name -> (path, is_package) for every module of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


MODULES = _modules()


def _resolve(module, is_package, node):
    """The package modules a ``from ... import ...`` statement in ``module`` loads."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module
    # `from pkg import name` loads pkg.name where that is a module, and pkg itself otherwise
    names = [f"{target}.{a.name}" for a in node.names]
    found = [n for n in names if n in MODULES]
    if len(found) < len(names):
        found.append(target)
    return found


def imports(module):
    """The modules of the package that ``module`` imports, anywhere in its source."""
    path, is_package = MODULES[module]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            out.update(_resolve(module, is_package, node))
    return {m for m in out if m in MODULES and m != module}


def _cycle(graph):
    """One import cycle of ``graph`` as a list of modules, or None."""
    state = {}  # module -> "open" while on the DFS stack, "done" after

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n, stack)):
                return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [])):
            return found
    return None


def test_the_import_graph_is_read_from_the_source():
    """The reader sees relative, absolute and function-level imports (a check of the check)."""
    assert "dask_pconv.autodiff.tape" in imports("dask_pconv.autodiff.rules")
    # tiled, geometry at the top; models inside conv2d_to_zarr
    assert {"dask_pconv.tiled", "dask_pconv.geometry", "dask_pconv.models"} <= imports("dask_pconv.store")
    assert "dask_pconv.train" in imports("dask_pconv.cli")  # inside main
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_among_the_package_modules():
    graph = {m: imports(m) for m in MODULES}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_tape_imports_nothing_from_the_rules():
    """The tracer knows no primitive: the rules bind the tensor operators themselves."""
    assert imports("dask_pconv.autodiff.tape") == set()


def _loaded_after(statement):
    code = (
        f"import sys; {statement}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'distributed'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize(
    "statement",
    [
        "import dask_pconv",
        "import dask_pconv.models",
        "import dask_pconv.store",
        "import dask_pconv.optim",
        "import dask_pconv.ops",
        "import dask_pconv.autodiff",
        "import dask_pconv.data",
        "import dask_pconv.train",
        "import dask_pconv.cli",
        # asking for the active client, where there can be none, does not import it either
        "from dask_pconv._client import active_client; assert active_client() is None",
        # (computing anything does: dask.compute imports distributed, if installed, to look for
        # a client, even for scheduler="sync")
    ],
)
def test_importing_does_not_import_distributed(statement):
    """Importing the package, its engine, models, optimizer, store, training loop or command
    line does not import distributed: only :mod:`dask_pconv.cluster` (starting or connecting to
    a cluster) and :mod:`dask_pconv.profiling` need it at import time."""
    assert _loaded_after(statement) == "[]"


#: The longest a class or a function (docstring included) may grow before it holds more than
#: one concern and wants splitting (the structure review's limits).
MAX_CLASS_LINES, MAX_FUNCTION_LINES = 250, 80


def test_no_class_or_function_outgrows_one_concern():
    too_long = []
    for module, (path, _) in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            limit = {ast.ClassDef: MAX_CLASS_LINES, ast.FunctionDef: MAX_FUNCTION_LINES}.get(type(node))
            if limit and node.end_lineno - node.lineno + 1 > limit:
                too_long.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines > {limit}")
    assert not too_long, "; ".join(too_long)


#: The package's floors, lowest first, as docs/layout.rst draws them: a module imports only
#: modules of its own floor or lower ones.  ``models`` holds two floors: the IR (layers,
#: program, tiling), below the stages that run it, and the Model with the shipped networks and
#: the converter, above them (a Model's forward calls run through the stages).
FLOORS = [
    (
        "leaves",
        ["geometry", "backend", "graphstats", "_client", "cluster", "profiling", "report", "_worker_init"],
    ),
    ("kernels", ["kernels"]),
    ("ops", ["ops"]),
    ("autodiff", ["autodiff", "optim"]),
    ("models: the IR", ["models.layers", "models.program", "models.tiling"]),
    ("stages", ["stages"]),
    ("models: the Model", ["models"]),
    (
        "training, storage and the command line",
        [
            "tiled",
            "store",
            "step",
            "train",
            "loop",
            "evaluation",
            "batching",
            "data",
            "checkpoint",
            "placement",
            "cli",
        ],
    ),
]


def _floor(module):
    """The floor of ``module`` (the longest prefix named in :data:`FLOORS`)."""
    if module == PACKAGE:
        return len(FLOORS)  # the package's own namespace re-exports from every floor
    name = module[len(PACKAGE) + 1 :]
    best = None
    for rank, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (rank, p)
    assert best is not None, f"{module} is on no floor of FLOORS: add it where docs/layout.rst puts it"
    return best[0]


def test_every_module_imports_only_its_own_floor_or_lower_ones():
    upward = [
        f"{m} ({FLOORS[_floor(m)][0]}) imports {n} ({FLOORS[_floor(n)][0]})"
        for m in MODULES
        for n in imports(m)
        if _floor(n) > _floor(m)
    ]
    assert not upward, "; ".join(upward)


def test_the_floor_check_sees_an_upward_import():
    assert (
        _floor("dask_pconv.models.layers")
        < _floor("dask_pconv.stages.block")
        < _floor("dask_pconv.models.model")
    )
    assert _floor("dask_pconv.kernels.conv") < _floor("dask_pconv.ops.conv")
