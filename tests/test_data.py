import pickle

import dask
import dask.array as da
import numpy as np
import pytest

from dask_pconv import data

# --- CIFAR-10 on small files written here, in the python-batch format -----------------------


def _cifar_arrays(n, seed):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]  # the real files hold a list of ints
    return pixels, labels


def _write_batch(path, pixels, labels, **extra):
    batch = {b"batch_label": b"test batch", b"data": pixels, b"labels": labels, **extra}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def _write_cifar(folder, n_train=(3, 2), n_test=4):
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, n in enumerate(n_train, start=1):
        written[f"data_batch_{i}"] = _cifar_arrays(n, seed=i)
        _write_batch(folder / f"data_batch_{i}", *written[f"data_batch_{i}"])
    written["test_batch"] = _cifar_arrays(n_test, seed=99)
    _write_batch(folder / "test_batch", *written["test_batch"])
    return written


def test_cifar10_reads_python_batches(tmp_path):
    written = _write_cifar(tmp_path)
    train, test = data.load_cifar10(tmp_path)
    assert train.x.shape == (5, 3, 32, 32) and test.x.shape == (4, 3, 32, 32)
    assert train.x.dtype == np.float32 and train.t.dtype == np.int64
    assert train.n_classes == test.n_classes == 10
    assert (train.name, test.name) == ("cifar10/train", "cifar10/test")
    pixels = np.concatenate([written["data_batch_1"][0], written["data_batch_2"][0]])
    labels = written["data_batch_1"][1] + written["data_batch_2"][1]
    # row layout: 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 image
    np.testing.assert_allclose(train.x[1, 2, 3, 4], pixels[1, 2 * 1024 + 3 * 32 + 4] / 255, rtol=1e-6)
    np.testing.assert_allclose(train.x, pixels.reshape(5, 3, 32, 32) / 255, rtol=1e-6)
    np.testing.assert_array_equal(train.t, labels)
    np.testing.assert_array_equal(test.t, written["test_batch"][1])
    assert 0 <= train.x.min() and train.x.max() <= 1


def test_cifar10_subfolder_and_batch_order(tmp_path):
    sub = tmp_path / "cifar-10-batches-py"
    sub.mkdir()
    # data_batch_10 must come after data_batch_2 (numeric, not lexicographic, order)
    for k, n in [(10, 1), (2, 2)]:
        _write_batch(sub / f"data_batch_{k}", np.full((n, 3072), k, np.uint8), [k % 10] * n)
    _write_batch(sub / "test_batch", *_cifar_arrays(1, seed=0))
    (sub / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"] * 10}))
    train, test = data.load_cifar10(str(tmp_path))
    np.testing.assert_array_equal(train.t, [2, 2, 0])
    assert len(test) == 1


def test_cifar10_accepts_str_keys(tmp_path):
    # files re-saved by Python 3 may use str keys
    _write_cifar(tmp_path, n_train=(1,))
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [3]}, f)
    train, _ = data.load_cifar10(tmp_path)
    assert train.t[0] == 3


def test_cifar10_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_cifar10(tmp_path / "nope")


def test_cifar10_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        data.load_cifar10(tmp_path)


def test_cifar10_missing_test_batch(tmp_path):
    _write_cifar(tmp_path)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch") as e:
        data.load_cifar10(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_cifar10_missing_train_batches(tmp_path):
    _write_cifar(tmp_path, n_train=())
    with pytest.raises(FileNotFoundError, match="data_batch_1") as e:
        data.load_cifar10(tmp_path)
    assert str(tmp_path) in str(e.value)


_PX = np.zeros((2, 3072), np.uint8)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"not a pickle at all", "unpickling failed"),
        (b"", "unpickling failed"),
        (pickle.dumps([1, 2, 3]), "dict"),
        (pickle.dumps({b"data": _PX}), "labels"),
        (pickle.dumps({b"labels": [0, 1]}), "data"),
        (pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}), "3072"),
        (pickle.dumps({b"data": np.zeros(3072, np.uint8), b"labels": [0]}), "3072"),
        (pickle.dumps({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}), "N >= 1"),
        (pickle.dumps({b"data": _PX.astype(np.float32), b"labels": [0, 1]}), "uint8"),
        (pickle.dumps({b"data": _PX.astype(np.int16) + 256, b"labels": [0, 1]}), "255"),
        (pickle.dumps({b"data": _PX, b"labels": [0]}), "2 labels"),
        (pickle.dumps({b"data": _PX, b"labels": [0, 10]}), r"\[0, 10\)"),
        (pickle.dumps({b"data": _PX, b"labels": [-1, 0]}), r"\[0, 10\)"),
        (pickle.dumps({b"data": _PX, b"labels": [0.5, 1.0]}), "integers"),
    ],
)
def test_cifar10_malformed(tmp_path, content, match):
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(content)
    with pytest.raises(ValueError, match=match) as e:
        data.load_cifar10(tmp_path)
    assert "data_batch_2" in str(e.value)


class _RunsCode:
    def __reduce__(self):
        return (_record_call, ("ran",))


_CALLS = []


def _record_call(what):
    _CALLS.append(what)
    return what


def test_cifar10_refuses_a_pickle_that_runs_code_as_its_docstring_says(tmp_path):
    """The docstring says what the restricted unpickler does (it said that pickle "can run code",
    which the loader does not let it): a pickle naming a function is refused before the call."""
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps({b"data": _RunsCode(), b"labels": [0]}))
    with pytest.raises(ValueError, match=r"refusing to load .*_record_call") as e:
        data.load_cifar10(tmp_path)
    assert "data_batch_2" in str(e.value) and _CALLS == []
    doc = " ".join(data.load_cifar10.__doc__.split())
    assert "can run code" not in doc and "only load files you trust" not in doc
    assert "restricted unpickler" in doc and "a tampered file cannot run code" in doc


# --- digits and synthetic -------------------------------------------------------------------


def test_digits_shapes_and_ranges():
    train, val = data.load_digits()
    assert len(train) + len(val) == 1797
    assert abs(len(val) - 0.2 * 1797) < 10
    for ds in (train, val):
        assert ds.x.shape == (len(ds), 3, 32, 32) and ds.x.dtype == np.float32
        assert ds.t.shape == (len(ds),) and ds.t.dtype == np.int64
        assert ds.n_classes == 10
        assert ds.x.min() == 0 and ds.x.max() == 1
        assert set(np.unique(ds.t)) == set(range(10))  # stratified: every class in both
    # nearest-neighbour upscaling of one grey image: 4x4 blocks, equal channels
    img = train.x[0]
    np.testing.assert_array_equal(img[0], img[2])
    np.testing.assert_array_equal(img[0], np.kron(img[0, ::4, ::4], np.ones((4, 4), np.float32)))
    assert set(np.unique(train.x * 16).round(4)) <= set(range(17))


def test_digits_deterministic_split():
    a_train, a_val = data.load_digits(seed=0)
    b_train, b_val = data.load_digits(seed=0)
    c_train, _ = data.load_digits(seed=1)
    np.testing.assert_array_equal(a_train.x, b_train.x)
    np.testing.assert_array_equal(a_val.t, b_val.t)
    assert a_train.x.shape == c_train.x.shape and not np.array_equal(a_train.x, c_train.x)
    a_train.x[...] = -1  # results are copies: the cache stays intact
    assert data.load_digits(seed=0)[0].x.min() == 0
    assert len(data.load_digits(val_fraction=0.5)[1]) == pytest.approx(1797 / 2, abs=10)


@pytest.mark.parametrize(
    "kw, err",
    [
        (dict(val_fraction=0), ValueError),
        (dict(val_fraction=1.0), ValueError),
        (dict(val_fraction="0.2"), TypeError),
        (dict(seed=-1), ValueError),
        (dict(seed=1.5), TypeError),
    ],
)
def test_digits_bad_args(kw, err):
    with pytest.raises(err, match=next(iter(kw))):
        data.load_digits(**kw)


def test_synthetic_deterministic_and_learnable():
    train, val = data.synthetic(n=200, n_classes=5, seed=3)
    again_train, again_val = data.synthetic(n=200, n_classes=5, seed=3)
    np.testing.assert_array_equal(train.x, again_train.x)
    np.testing.assert_array_equal(val.t, again_val.t)
    assert not np.array_equal(train.x, data.synthetic(n=200, n_classes=5, seed=4)[0].x)
    assert len(train) + len(val) == 200 and len(val) == 40
    assert train.x.shape == (160, 3, 32, 32) and train.x.dtype == np.float32
    assert train.t.dtype == np.int64 and train.n_classes == 5
    assert 0 <= train.x.min() and train.x.max() <= 1
    assert np.bincount(train.t).tolist() == [32] * 5
    # learnable: nearest class mean of the training set classifies the validation set
    means = np.stack([train.x[train.t == c].mean(0) for c in range(5)])
    dist = ((val.x[:, None] - means[None]) ** 2).sum(axis=(2, 3, 4))
    assert (dist.argmin(1) == val.t).mean() > 0.9


@pytest.mark.parametrize(
    "kw, err",
    [
        (dict(n=1), ValueError),
        (dict(n_classes=0), ValueError),
        (dict(n=3, n_classes=3), ValueError),  # one image per class: val would be empty
        (dict(val_fraction=-0.1), ValueError),
    ],
)
def test_synthetic_bad_args(kw, err):
    with pytest.raises(err):
        data.synthetic(**kw)


def test_load_dataset_dispatch(tmp_path):
    train, val = data.load_dataset()
    assert train.name == "digits/train" and len(train) + len(val) == 1797
    assert data.load_dataset("Synthetic")[0].name == "synthetic/train"
    _write_cifar(tmp_path)
    assert data.load_dataset("cifar10", data_dir=tmp_path)[1].name == "cifar10/test"
    with pytest.raises(ValueError, match="data_dir"):
        data.load_dataset("cifar10")
    with pytest.raises(ValueError, match="'digits', 'cifar10', 'synthetic'"):
        data.load_dataset("mnist")


def test_dataset_validates():
    x = np.zeros((2, 3, 4, 4), np.float64)
    ds = data.Dataset(x, [0, 1], 2, "tiny")
    assert ds.x.dtype == np.float32 and ds.t.dtype == np.int64 and len(ds) == 2
    assert "tiny" in repr(ds)
    with pytest.raises(ValueError, match="4-D"):
        data.Dataset(np.zeros((2, 3)), [0, 1], 2)
    with pytest.raises(ValueError, match="shape"):
        data.Dataset(x, [0], 2)
    with pytest.raises(ValueError, match="labels"):
        data.Dataset(x, [0, 2], 2)
    with pytest.raises(TypeError, match="floating"):
        data.Dataset(x.astype(np.uint8), [0, 1], 2)
    with pytest.raises(TypeError, match="integer"):
        data.Dataset(x, [0.0, 1.0], 2)


# --- batching -------------------------------------------------------------------------------


def test_epoch_batches_deterministic_and_per_epoch():
    a = data.epoch_batches(100, 10, epoch=0, seed=7)
    b = data.epoch_batches(100, 10, epoch=0, seed=7)
    c = data.epoch_batches(100, 10, epoch=1, seed=7)
    d = data.epoch_batches(100, 10, epoch=0, seed=8)
    assert len(a) == 10 and all(i.shape == (10,) and i.dtype == np.int64 for i in a)
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))
    assert not np.array_equal(np.concatenate(a), np.concatenate(d))
    np.testing.assert_array_equal(np.sort(np.concatenate(c)), np.arange(100))
    np.testing.assert_array_equal(np.concatenate(a), np.random.default_rng([7, 0]).permutation(100))


def test_epoch_batches_drop_last():
    kept = data.epoch_batches(10, 4, epoch=2, seed=0)
    assert [len(i) for i in kept] == [4, 4]
    full = data.epoch_batches(10, 4, epoch=2, seed=0, drop_last=False)
    assert [len(i) for i in full] == [4, 4, 2]
    np.testing.assert_array_equal(np.sort(np.concatenate(full)), np.arange(10))
    np.testing.assert_array_equal(np.concatenate(kept), np.concatenate(full)[:8])
    assert [len(i) for i in data.epoch_batches(5, 5, 0, 0)] == [5]


@pytest.mark.parametrize(
    "args, err, match",
    [
        ((10, 0, 0, 0), ValueError, "batch_size"),
        ((10, 11, 0, 0), ValueError, "batch_size"),
        ((10, 2.0, 0, 0), TypeError, "batch_size"),
        ((0, 1, 0, 0), ValueError, "n"),
        ((10, 2, -1, 0), ValueError, "epoch"),
        ((10, 2, 0, -3), ValueError, "seed"),
    ],
)
def test_epoch_batches_bad_args(args, err, match):
    with pytest.raises(err, match=match):
        data.epoch_batches(*args)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("", {}),
        ("none", {}),
        (" None ", {}),
        (None, {}),
        ("batch:2", {"batch": 2}),
        ("out_channel:4", {"out_channel": 4}),
        ("spatial:2x2", {"spatial": (2, 2)}),
        ("spatial:2", {"spatial": (2, 2)}),
        ("spatial:3x1", {"spatial": (3, 1)}),
        ("batch:2,spatial:2x1", {"batch": 2, "spatial": (2, 1)}),
        ("batch:2, out_channel:2, spatial:1x4", {"batch": 2, "out_channel": 2, "spatial": (1, 4)}),
        ("BATCH:8,Spatial:2X2", {"batch": 8, "spatial": (2, 2)}),
        ("batch: 2", {"batch": 2}),
    ],
)
def test_parse_split_good(spec, expected):
    assert data.parse_split(spec) == expected


@pytest.mark.parametrize(
    "spec, match",
    [
        ("batch", "batch"),  # no count
        ("batch:", "''"),
        ("depth:2", "depth"),
        ("batch:0", "batch:0"),
        ("batch:-1", "batch:-1"),
        ("batch:1.5", "batch:1.5"),
        ("batch:two", "batch:two"),
        ("out_channel:+2", r"out_channel:\+2"),
        ("channel:+2", r"channel:\+2"),  # the old spelling: refused like the new one, no warning first
        ("channel:2,out_channel:2", "twice"),
        ("batch:2,batch:4", "twice"),
        ("spatial:2x", "spatial:2x"),
        ("spatial:x2", "spatial:x2"),
        ("spatial:2x2x2", "spatial:2x2x2"),
        ("spatial:0x2", "spatial:0x2"),
        ("spatial:2*2", r"spatial:2\*2"),
        ("batch:2,", "''"),
        ("batch:2,none", "none"),
        ("batch=2", "batch=2"),
    ],
)
def test_parse_split_bad(spec, match):
    with pytest.raises(ValueError, match=match):
        data.parse_split(spec)


def test_parse_split_type():
    with pytest.raises(TypeError, match="string"):
        data.parse_split(2)


def test_chunk_batch_chunks():
    x = np.random.default_rng(0).random((10, 3, 32, 32), dtype=np.float32)
    t = np.arange(10, dtype=np.int64)
    xd, td = data.chunk_batch(x, t, {"batch": 4, "spatial": (2, 3)})
    assert isinstance(xd, da.Array) and isinstance(td, da.Array)
    assert xd.chunks == ((3, 3, 2, 2), (3,), (16, 16), (11, 11, 10))
    assert td.chunks == ((3, 3, 2, 2),)
    np.testing.assert_array_equal(xd.compute(), x)
    np.testing.assert_array_equal(td.compute(), t)
    assert xd.chunks == data.chunk_batch(x, t, "batch:4,spatial:2x3")[0].chunks


def test_chunk_batch_tiles_per_pixel_labels_like_the_images():
    x = np.random.default_rng(1).random((6, 2, 12, 10), dtype=np.float32)
    t = np.random.default_rng(1).integers(0, 3, (6, 12, 10))
    xd, td = data.chunk_batch(x, t, "batch:2,spatial:3x2")
    assert td.chunks == (xd.chunks[0],) + xd.chunks[2:]
    np.testing.assert_array_equal(td.compute(), t)
    with pytest.raises(ValueError, match=r"t must have shape \(6,\) or \(6, 12, 10\)"):
        data.chunk_batch(x, t[:, :5], {})


def test_to_dask_is_the_first_name_of_chunk_batch():
    from dask_pconv import batching

    assert batching.to_dask is batching.chunk_batch
    assert data.to_dask is data.chunk_batch is batching.chunk_batch
    assert {"chunk_batch", "to_dask"} <= set(batching.__all__) & set(data.__all__)


def test_chunk_batch_channel_split_leaves_images_whole():
    x = np.zeros((4, 3, 8, 8), np.float32)
    xd, td = data.chunk_batch(x, np.zeros(4, np.int64), data.parse_split("out_channel:3,batch:2"))
    assert xd.chunks == ((2, 2), (3,), (8,), (8,))
    assert td.chunks == ((2, 2),)
    for split in (None, {}, "none"):
        xd, td = data.chunk_batch(x, np.zeros(4, np.int64), split)
        assert xd.numblocks == (1, 1, 1, 1) and td.numblocks == (1,)


def test_chunk_batch_bad_args():
    x = np.zeros((4, 3, 8, 8), np.float32)
    t = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="depth"):
        data.chunk_batch(x, t, {"depth": 2})
    with pytest.raises(ValueError, match="batch"):
        data.chunk_batch(x, t, {"batch": 5})
    with pytest.raises(ValueError, match="4-D"):
        data.chunk_batch(x[0], t, {})
    with pytest.raises(ValueError, match="t must have shape"):
        data.chunk_batch(x, t[:3], {})
    with pytest.raises(TypeError, match="split"):
        data.chunk_batch(x, t, 2)


def test_parse_split_reads_the_old_channel_spelling_as_output_channels():
    with pytest.warns(DeprecationWarning, match=r"'channel:N' is the old spelling of 'out_channel:N'"):
        assert data.parse_split("batch:2,channel:4") == {"batch": 2, "out_channel": 4}


@pytest.mark.parametrize(
    "split, spec",
    [
        ({}, "none"),
        ({"spatial": (2, 3), "batch": 2}, "batch:2,spatial:2x3"),
        ({"out_channel": 4}, "out_channel:4"),
        ({"channel": 4}, "out_channel:4"),  # the old key of a dict
        ("spatial:2", "spatial:2x2"),
    ],
)
def test_format_split_writes_what_parse_split_reads(split, spec):
    assert data.format_split(split) == spec
    assert data.parse_split(spec) == data.check_split(split, (8, 3, 32, 32))


@pytest.mark.parametrize(
    "split, match",
    [
        ("batch:9", r"batch:9 asks for more pieces than the 8 images of a batch"),
        ("spatial:33x1", r"spatial:33x1 asks for more tiles than an image has pixels \(32x32\)"),
        ("spatial:1x33", r"spatial:1x33"),
        ({"channel": 2, "out_channel": 2}, r"both 'channel' \(the old name\) and 'out_channel'"),
        ({"depth": 2}, r"unknown split axes \['depth'\]"),
    ],
)
def test_check_split_refuses_what_does_not_fit(split, match):
    with pytest.raises(ValueError, match=match):
        data.check_split(split, (8, 3, 32, 32))


def test_the_largest_split_check_split_allows_trains():
    """One pixel row per tile (32 tiles: every feature map from 16x16 down to VGG16's last 1x1
    has fewer rows than that): the loss and gradients equal the unsplit ones, so check_split's
    bound is what the code needs."""
    from dask_pconv.models import VGG16

    x = np.random.default_rng(0).random((2, 3, 32, 32))
    t = np.array([0, 1])
    m = VGG16(n_classes=2, width=0.0625, seed=0, dtype=np.float64)
    out = {}
    for spec in ("none", "spatial:32x1"):
        xd, td = data.chunk_batch(x, t, data.check_split(spec, x.shape))
        out[spec] = dask.compute(*m.forward_backward(xd, td, dropout=False), scheduler="sync")
    (l0, g0), (l1, g1) = out.values()
    np.testing.assert_allclose(l1, l0, rtol=1e-12)
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-9, atol=1e-12, err_msg=k)
