"""dask_pconv.backend: the array namespace of a block, device tests, host copies, wrapping.

Device arrays are the CuPy stand-in of tests/standin.py (its own namespace through
``__array_namespace__``, an explicit ``.get()``, no implicit conversion)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest

from dask_pconv import backend
from dask_pconv.kernels import Padded, get_namespace

import standin
from standin import StandInArray, to_device

PACKAGE = Path(backend.__file__).parent


def test_array_namespace_is_the_libraries_own_module():
    a = np.ones((2, 3))
    assert backend.array_namespace(a) is np
    assert backend.array_namespace(a, 1.0, np.float32(2), 3) is np
    assert backend.array_namespace() is np
    assert backend.array_namespace(2.0, np.int64(1)) is np  # scalars alone: NumPy
    assert backend.array_namespace(to_device(a)) is standin.namespace
    assert backend.array_namespace(to_device(a), 2.0, to_device(a)) is standin.namespace
    assert get_namespace is backend.array_namespace  # the kernels' name for it


def test_array_namespace_refuses_two_libraries():
    with pytest.raises(TypeError, match="Multiple namespaces"):
        backend.array_namespace(np.ones(2), to_device(np.ones(2)))


def test_is_device():
    a = np.ones((2, 2))
    d = to_device(a)
    assert backend.is_device(d) and backend.is_device(standin.meta(4, np.float32))
    assert backend.is_device(da.from_array(d, chunks=1, asarray=False, name=False))
    for host in (a, a[:, 0], np.ma.masked_array(a), np.float64(1.0), 1.0, np.float32, da.ones(3)):
        assert not backend.is_device(host)
    assert not backend.is_device(Padded(a[None, None], (1, 1, 1, 1), 0))


def test_is_numpy_takes_plain_ndarrays_only():
    a = np.ones(3)
    assert backend.is_numpy(a) and backend.is_numpy(a[1:])
    assert not backend.is_numpy(np.ma.masked_array(a))
    assert not backend.is_numpy(to_device(a))


def test_is_cupy_takes_no_lookalike():
    for a in (np.ones(3), to_device(np.ones(3)), standin.meta(2, np.float64)):
        assert not backend.is_cupy(a)


def test_is_cupy_takes_cupy_arrays():
    cupy = pytest.importorskip("cupy", reason="a GPU and CuPy: pip install -e '.[gpu]'")
    assert backend.is_cupy(cupy.ones(3))


def test_to_host_copies_device_arrays_explicitly():
    a = np.arange(6.0).reshape(2, 3)
    assert backend.to_host(a) is a
    standin.LOG.clear()
    h = backend.to_host(to_device(a))
    assert type(h) is np.ndarray
    np.testing.assert_array_equal(h, a)
    assert standin.LOG.count("download") == 1
    with pytest.raises(TypeError, match="to_host needs a NumPy or device array, got list"):
        backend.to_host([1.0, 2.0])


def test_asarray_like_copies_to_the_library_of_like():
    a = np.arange(3.0)
    got = backend.asarray_like(a, standin.meta(1, np.float64))
    assert isinstance(got, StandInArray)
    np.testing.assert_array_equal(got.get(), a)
    assert type(backend.asarray_like(a, np.empty(0))) is np.ndarray


def test_to_dask_array_names_numpy_arrays_by_content_and_device_arrays_at_random():
    a = np.arange(12.0).reshape(3, 4)
    x = backend.to_dask_array(a, (1, 4))
    assert x.chunks == ((1, 1, 1), (4,))
    assert backend.to_dask_array(a.copy(), (1, 4)).name == x.name
    assert backend.to_dask_array(x, (3, 4)) is x
    standin.LOG.clear()
    d = to_device(a)
    xd, xd2 = backend.to_dask_array(d, a.shape), backend.to_dask_array(d, a.shape)
    assert isinstance(xd._meta, StandInArray) and xd.name != xd2.name
    assert not [e for e in standin.LOG if e.startswith("download")]
    assert backend.to_dask_array([1.0, 2.0], -1).dtype == np.float64


def test_wrap_is_the_first_name_of_to_dask_array():
    assert backend.wrap is backend.to_dask_array
    assert {"to_dask_array", "wrap"} <= set(backend.__all__)


def test_on_device_of():
    a = da.from_array(np.arange(4.0), chunks=2)
    like = da.from_array(to_device(np.ones(4)), chunks=2, asarray=False, name=False)
    assert backend.on_device_of(a, a) is a
    assert backend.on_device_of(like, like) is like
    moved = backend.on_device_of(a, like)
    assert moved.name.startswith("to-device-") and isinstance(moved._meta, StandInArray)
    assert moved.name == backend.on_device_of(a, like).name  # one copy per operand, not per use
    with dask.config.set(scheduler="synchronous"):
        np.testing.assert_array_equal(standin.blocks_to_host(moved), np.arange(4.0))
    with pytest.raises(TypeError, match="an operand has .*StandInArray blocks but the input has NumPy"):
        backend.on_device_of(like, a)
    with pytest.raises(TypeError, match="on_device_of needs a Dask array, got ndarray"):
        backend.on_device_of(np.ones(2), like)


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "backend.py")


# the ways modules told device arrays apart before the backend did it for them all
_DEVICE_TESTS = re.compile(r"__module__|\bis (not )?np\.ndarray\b|\.get\(\)")


def test_only_the_backend_tells_device_arrays_apart():
    found = [
        f"{p.relative_to(PACKAGE)}:{i}: {line.strip()}"
        for p in _modules()
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if _DEVICE_TESTS.search(line)
    ]
    assert not found, "\n".join(found)


def _imported_modules(path):
    """Dotted names of the package's modules that ``path`` imports (function-level too)."""
    package = list(path.relative_to(PACKAGE.parent).parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "dask_pconv")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = package[: len(package) - node.level + 1] + (
                    node.module.split(".") if node.module else []
                )
            elif (node.module or "").split(".")[0] == "dask_pconv":
                mod = node.module.split(".")
            else:
                continue
            for a in node.names:  # ``from . import _torch`` imports a module, not a name
                sub = PACKAGE.parent.joinpath(*mod, a.name)
                is_module = sub.with_suffix(".py").exists() or sub.is_dir()
                yield ".".join(mod + [a.name] if is_module else mod)


def test_no_module_imports_a_private_module_of_another_package():
    """Private modules (``ops/_halo.py``, ``kernels/_namespace.py``) serve their own package;
    what others need is public (``models/`` and ``optim.py`` once imported ``ops/_device.py``)."""
    found = []
    for p in _modules():
        own = ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
        for mod in _imported_modules(p):
            parts = mod.split(".")
            private = [i for i, part in enumerate(parts) if part.startswith("_") and part != "__init__"]
            if private and ".".join(parts[: private[0]]) != own:
                found.append(f"{p.relative_to(PACKAGE)} imports {mod}")
    assert not found, "\n".join(found)
