"""Index structures against plain models."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from obd.formats.lsmt import RUN_DATA, RUN_HOLE, RUN_ZERO, Mappings, SegmentIndex, merge_layers
from obd.formats.lsmt.rw import MutableIndex

records = st.lists(
    st.tuples(st.integers(0, 300), st.integers(0, 60), st.integers(8, 10_000), st.booleans()),
    max_size=60,
)


def _paint(recs, size=400):
    """Model: for each sector, (record number, sector's moffset or None when zeroed)."""
    model = [None] * size
    for r, (off, ln, mo, z) in enumerate(recs):
        for k in range(off, off + ln):
            model[k] = (r, None if z else mo + (k - off))
    return model


def _from_index(idx: MutableIndex, size=400):
    out = [None] * size
    for kind, sec, cnt, moff, _tag in idx.runs(0, size):
        for k in range(cnt):
            if kind == RUN_DATA:
                out[sec + k] = moff + k
            elif kind == RUN_ZERO:
                out[sec + k] = "z"
    return out


def _flatten(model):
    return [None if m is None else ("z" if m[1] is None else m[1]) for m in model]


@pytest.fixture(params=[2, 3, 512], ids=lambda n: f"chunk{n}")
def chunk_load(request, monkeypatch):
    """Small chunks make inserts cross, split and empty chunks."""
    monkeypatch.setattr(MutableIndex, "LOAD", request.param)
    return request.param


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(recs=records)
def test_insert_and_bulk_load_agree_with_model(recs, chunk_load):
    seq = MutableIndex()
    for off, ln, mo, z in recs:
        seq.insert(off, ln, mo, z)
    m = Mappings.from_lists(
        [r[0] for r in recs], [r[1] for r in recs], [r[2] for r in recs], [r[3] for r in recs]
    )
    keep = m.length > 0
    bulk = MutableIndex.from_log(m.select(keep))
    assert _from_index(seq) == _flatten(_paint(recs))
    assert len(seq) == len(seq.starts)
    for a in range(0, 350, 37):  # runs over any window agree with the whole walk
        got = [(k, s, c, m) for k, s, c, m, _ in seq.runs(a, a + 50)]
        want = []
        for k, s, c, m, _ in seq.runs(0, 400):
            lo, hi = max(s, a), min(s + c, a + 50)
            if hi > lo:
                want.append((k, lo, hi - lo, m + (lo - s) if k == RUN_DATA else 0))
        assert got == want
    # the bulk load builds the very same entries (sealing writes them out as they are)
    assert (bulk.starts, bulk.ends, bulk.moffs, bulk.zeroed) == (
        seq.starts,
        seq.ends,
        seq.moffs,
        seq.zeroed,
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(records, min_size=1, max_size=4))
def test_merge_layers_top_wins(layers):
    """Layers given top first; each a non-overlapping index built by insertion."""
    idxs = []
    for recs in layers:
        mi = MutableIndex()
        for off, ln, mo, z in recs:
            mi.insert(off, ln, mo, z)
        idxs.append(mi.mappings())
    merged = SegmentIndex(merge_layers(idxs))
    expect = [None] * 400
    for depth in reversed(range(len(layers))):
        for kind, sec, cnt, moff, _ in SegmentIndex(idxs[depth]).runs(0, 400):
            for k in range(cnt):
                if kind != RUN_HOLE:
                    expect[sec + k] = (depth, "z" if kind == RUN_ZERO else moff + k)
    got = [None] * 400
    for kind, sec, cnt, moff, tag in merged.runs(0, 400):
        for k in range(cnt):
            if kind != RUN_HOLE:
                got[sec + k] = (tag, "z" if kind == RUN_ZERO else moff + k)
    assert got == expect
    assert np.all(merged.m.offset[1:] >= merged.m.offset[:-1] + merged.m.length[:-1])


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(
        st.tuples(
            st.integers(0, 300),
            st.integers(0, 60),
            st.integers(8, 10_000),
            st.booleans(),
            st.booleans(),
        ),
        max_size=60,
    )
)
def test_insert_with_holes_agrees_with_model(ops, chunk_load):
    """``insert(..., hole=True)`` unmaps a range (a sparse layer's discard)."""
    idx = MutableIndex()
    model: list[object] = [None] * 400
    for off, ln, mo, z, hole in ops:
        idx.insert(off, ln, mo, z, hole=hole)
        for k in range(off, off + ln):
            model[k] = None if hole else ("z" if z else mo + (k - off))
    assert _from_index(idx) == model
    assert len(idx) == len(idx.starts)
    assert all(e <= s for e, s in zip(idx.ends, idx.starts[1:], strict=False))  # sorted, disjoint
