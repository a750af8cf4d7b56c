"""The pure geometry, tested on its own against brute force."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dask_pconv import geometry as geo

from strategies import partitions


def test_output_length_formula():
    assert geo.output_length(32, 3, 1, (1, 1), 1) == 32
    assert geo.output_length(32, 3, 2, (1, 1), 1) == 16
    assert geo.output_length(10, 3, 1, (0, 0), 3) == 4
    assert geo.output_length(2, 5, 1, (0, 0), 1) <= 0


def test_resolve_padding():
    assert geo.resolve_padding("valid", (3, 3), (1, 1), (1, 1)) == ((0, 0), (0, 0))
    assert geo.resolve_padding("same", (4, 3), (1, 1), (1, 2)) == ((1, 2), (2, 2))
    assert geo.resolve_padding((1, 2), (3, 3), (2, 2), (1, 1)) == ((1, 1), (2, 2))
    with pytest.raises(ValueError, match="strided"):
        geo.resolve_padding("same", (3, 3), (2, 1), (1, 1))
    with pytest.raises(ValueError, match="padding"):
        geo.resolve_padding("full", (3, 3), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="padding"):
        geo.resolve_padding(-1, (3, 3), (1, 1), (1, 1))


@st.composite
def axis_cases(draw):
    L = draw(st.integers(1, 30))
    k, s, d = draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    pad = (draw(st.integers(0, 4)), draw(st.integers(0, 4)))
    chunks = draw(partitions(L))
    return L, chunks, k, s, pad, d


@given(axis_cases())
def test_plan_axis_against_brute_force(case):
    L, chunks, k, s, pad, d = case
    n_out = geo.output_length(L, k, s, pad, d)
    if n_out < 1:
        return
    plan = geo.plan_axis(chunks, k, s, pad, d)
    assert sum(plan.out_chunks) == n_out and all(c > 0 for c in plan.out_chunks)
    assert len(plan.out_chunks) <= len(chunks)
    o0 = 0
    offsets = [sum(chunks[:j]) for j in range(len(chunks))]
    for n, (start, stop), (pb, pa, pieces) in zip(plan.out_chunks, plan.windows, plan.sources):
        # the window is exactly the union of what its outputs read
        read = {o * s - pad[0] + t * d for o in range(o0, o0 + n) for t in range(k)}
        assert min(read) == start and max(read) == stop - 1
        # pieces + padding rebuild the window, in order, from real input indices only
        idx = list(range(start, start + pb))
        for j, lo, hi in pieces:
            idx += [offsets[j] + t for t in range(lo, hi)]
        idx += list(range(stop - pa, stop))
        assert idx == list(range(start, stop))
        assert all(0 <= offsets[j] + lo and offsets[j] + hi <= L for j, lo, hi in pieces)
        assert all(i < 0 or i >= L for i in range(start, start + pb))
        assert all(i < 0 or i >= L for i in range(stop - pa, stop))
        o0 += n


def test_same_conv_keeps_chunks_and_stride_divides_them():
    chunks = (4, 4, 8, 3)
    assert geo.output_chunks(chunks, 3, 1, (1, 1), 1) == chunks
    assert geo.output_chunks(chunks, 5, 1, (4, 4), 2) == chunks
    assert geo.output_chunks((4, 4, 8), 2, 2, (0, 0), 1) == (2, 2, 4)
    assert geo.output_chunks((4, 4, 8), 3, 2, (1, 1), 1) == (2, 2, 4)


def test_channel_segments():
    # groups=1: one segment, everything
    (s,) = geo.channel_segments((2, 5), (3, 7), 8, 10, 1)
    assert (s.o, s.c, s.wc) == ((0, 3), (0, 4), (3, 7))
    # depthwise: output chunk [2, 6) of 8 (multiplier 2) meets input chunk [1, 4) in groups 1, 2
    segs = geo.channel_segments((2, 6), (1, 4), 8, 4, 4)
    assert [(x.group, x.o, x.c, x.wc) for x in segs] == [
        (1, (0, 2), (0, 1), (0, 1)),
        (2, (2, 4), (1, 2), (0, 1)),
    ]
    assert geo.channel_segments((0, 2), (2, 4), 4, 4, 2) == ()


def test_even_chunks():
    assert geo.even_chunks(10, 3) == (4, 3, 3)
    with pytest.raises(ValueError):
        geo.even_chunks(3, 4)
    with pytest.raises(TypeError):
        geo.normalize_pair(1.0, "stride")
    with pytest.raises(ValueError, match="dilation"):
        geo.normalize_pair((1, 0), "dilation")


def test_normalize_pair_takes_one_element_tuples_as_pytorch_does():
    assert geo.normalize_pair((3,), "stride") == (3, 3)
    assert geo.normalize_pair([2], "padding", minimum=0) == (2, 2)
    assert geo.normalize_pair([2, 5], "dilation") == (2, 5)
    for bad in [(), (1, 2, 3), (True,), (1.0,), "2"]:
        with pytest.raises(TypeError, match="stride must be an int or a pair"):
            geo.normalize_pair(bad, "stride")
    with pytest.raises(ValueError, match=r"stride must be positive, got \(0,\)"):
        geo.normalize_pair((0,), "stride")


@given(
    st.integers(1, 30),
    st.integers(1, 5),
    st.integers(1, 4),
    st.integers(0, 2),
    st.integers(1, 3),
    st.booleans(),
)
def test_pool_pads_give_pytorchs_output_length(L, k, s, p, d, ceil_mode):
    """``pool_pads`` against PyTorch's ``pooling_output_shape`` (written out here): the padded
    length gives its output length, the extra padding only covers what the last window reads,
    and that window starts inside the input or its left padding."""
    if p > k // 2:
        return
    span = d * (k - 1) + 1
    n = (L + 2 * p - span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (n - 1) * s >= L + p:
        n -= 1
    lo, hi = geo.pool_pads(L, k, s, p, d, ceil_mode)
    assert lo == p and hi >= p and (ceil_mode or hi == p)
    assert geo.output_length(L, k, s, (lo, hi), d) == n or (
        n < 1 and geo.output_length(L, k, s, (lo, hi), d) < 1
    )
    if n >= 1:
        assert (n - 1) * s - p < L  # the last window's first tap is in the image or left padding
        assert hi == p or (n - 1) * s + span == L + lo + hi  # no more padding than read


@given(st.integers(1, 12), st.integers(1, 5), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2))
def test_window_length_is_what_the_outputs_read(n_out, k, s, d, tail):
    """``window_length`` against the indices ``n_out`` outputs read, and as the inverse of
    ``output_length``: a window longer by less than a stride has the same outputs."""
    L = geo.window_length(n_out, k, s, d)
    assert L == max(o * s + t * d for o in range(n_out) for t in range(k)) + 1
    assert geo.output_length(L + tail % s, k, s, (0, 0), d) == n_out
    assert geo.window(3, 3 + n_out, k, s, (2, 0), d) == (3 * s - 2, 3 * s - 2 + L)


def test_block_sizes_go_from_window_to_output_and_back():
    # kernel (3, 2), stride (2, 1), dilation (1, 3): rows (9 - 2 - 1) // 2 + 1, columns 10 - 3
    assert geo.block_output_hw((9, 10), (3, 2), (2, 1), (1, 3)) == (4, 7)
    assert geo.block_window_hw((4, 7), (3, 2), (2, 1), (1, 3)) == (9, 10)
    # a window one row past its last tap's reach: the row is not read
    assert geo.block_output_hw((10, 10), (3, 2), (2, 1), (1, 3)) == (4, 7)


@given(
    st.tuples(st.integers(1, 4), st.integers(1, 4)),
    st.tuples(st.integers(1, 5), st.integers(1, 5)),
    st.tuples(st.integers(1, 3), st.integers(1, 3)),
    st.tuples(st.integers(1, 3), st.integers(1, 3)),
)
def test_taps_against_brute_force(kernel, out_hw, stride, dilation):
    """Tap ``(i, j)`` reads window element ``(o*sy + i*dy, p*sx + j*dx)`` for output ``(o, p)``,
    taps in row-major order, all inside the window."""
    Hw, Ww = geo.block_window_hw(out_hw, kernel, stride, dilation)
    got = list(geo.taps(kernel, out_hw, stride, dilation))
    assert [(i, j) for i, j, _ in got] == [(i, j) for i in range(kernel[0]) for j in range(kernel[1])]
    for i, j, (rows, cols) in got:
        assert list(range(Hw))[rows] == [o * stride[0] + i * dilation[0] for o in range(out_hw[0])]
        assert list(range(Ww))[cols] == [p * stride[1] + j * dilation[1] for p in range(out_hw[1])]


def test_crop_index_and_symmetric_crop():
    assert geo.crop_index(((1, 4), (0, 2))) == (slice(None), slice(None), slice(1, 4), slice(0, 2))
    # a tile with equal margins is the window less a padding (PyTorch's ``padding``)
    assert geo.symmetric_crop(((2, 7), (1, 5)), (9, 6)) == (2, 1)
    assert geo.symmetric_crop(((0, 9), (0, 6)), (9, 6)) == (0, 0)
    assert geo.symmetric_crop(((2, 6), (1, 5)), (9, 6)) is None
    assert geo.symmetric_crop(((2, 7), (1, 4)), (9, 6)) is None
