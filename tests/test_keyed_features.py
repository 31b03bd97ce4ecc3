"""Stateful features against a brute-force reference (hypothesis): every aggregate of every
window type, lags, label history, time features, out-of-order and late records, TTL and
max_keys eviction; batch-size invariance; state round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyed_reference import Reference
from tensorstream.features import FeaturePipeline
from tensorstream.features.records import category_key
from tensorstream.spec import FeatureSpec, SpecError, parse_spec

AGGS = ["count", "sum", "mean", "min", "max", "std", "last", "distinct"]


def _spec(**kw):
    base = {"key": "k", "time": "ts", "standardize": False,
            "windows": [{"field": "x", "type": "sliding", "size": 50, "aggs": AGGS},
                        {"field": "x", "type": "tumbling", "size": 40, "aggs": AGGS},
                        {"field": "x", "type": "hopping", "size": 60, "hop": 20, "aggs": AGGS},
                        {"type": "sliding", "size": 30, "aggs": ["count"]}],
            "lags": {"x": 3}, "label_history": 2, "time_features": ["hour_of_day", "day_of_week"],
            "state": {"allowed_lateness": 15, "max_events": 1000}}
    base.update(kw)
    return FeatureSpec.model_validate(base)


records_st = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(-12, 25), st.integers(-3, 6),
              st.one_of(st.none(), st.integers(0, 1))),
    min_size=1, max_size=120)


def _records(draw):
    t, recs, labels = 1_700_000_000_000, [], []
    for k, dt, x, y in draw:
        t += dt
        recs.append({"k": k, "ts": t, "x": x})
        labels.append(np.nan if y is None else float(y))
    return recs, np.array(labels)


def _run(spec, recs, labels, batch):
    fp = FeaturePipeline(spec, "y", label_width=2)
    out = []
    for a in range(0, len(recs), batch):
        p = fp.parse(recs[a:a + batch])
        out.append(fp.transform_parsed(p, labels=labels[a:a + batch], sequential=True))
    return np.concatenate(out).astype(np.float64), fp


def _reference(spec, recs, labels):
    ref = Reference(spec)
    rows = []
    for r, y in zip(recs, labels, strict=True):
        cats = {"x": category_key("x", r["x"])}
        rows.append(ref.step(r["k"], r["ts"], {"x": float(r["x"])}, cats, None if np.isnan(y) else y))
    return np.nan_to_num(np.array(rows)), ref


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records_st, st.sampled_from([1, 3, 64]))
def test_every_aggregate_matches_the_brute_force_reference(draw, batch):
    spec = _spec()
    recs, labels = _records(draw)
    X, fp = _run(spec, recs, labels, batch)
    R, ref = _reference(spec, recs, labels)
    assert X.shape == R.shape
    np.testing.assert_allclose(X, R, rtol=1e-5, atol=1e-4)  # float32 features
    assert fp.keyed.counters["late_records"] == ref.late


@settings(max_examples=30, deadline=None)
@given(records_st)
def test_the_batch_size_never_changes_a_feature(draw):
    spec = _spec(standardize=True)
    recs, labels = _records(draw)
    X1, fp1 = _run(spec, recs, labels, 1)
    for b in (7, 64):
        Xb, fpb = _run(spec, recs, labels, b)
        np.testing.assert_allclose(Xb, X1, rtol=1e-5, atol=1e-5)
        s1, sb = fp1.state_dict(), fpb.state_dict()
        assert s1["keyed/store/keys"].tobytes() == sb["keyed/store/keys"].tobytes()
        r1 = s1["keyed/store/rows"].view(fp1.keyed.dtype)
        rb = sb["keyed/store/rows"].view(fpb.keyed.dtype)
        for name in r1.dtype.names:
            np.testing.assert_allclose(r1[name], rb[name], rtol=1e-9, atol=1e-9, err_msg=name)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 30)), min_size=1, max_size=150),
       st.sampled_from([1, 5, 64]))
def test_ttl_and_max_keys_evict_at_the_same_points_whatever_the_batch(draw, batch):
    spec = _spec(windows=[], time_features=[], label_history=0,
                 state={"ttl": 40, "max_keys": 3, "sweep_every": 7})
    t, recs = 1_000, []
    for k, dt in draw:
        t += dt
        recs.append({"k": k, "ts": t, "x": float(len(recs))})
    labels = np.full(len(recs), np.nan)
    X, fp = _run(spec, recs, labels, batch)
    R, ref = _reference(spec, recs, labels)
    np.testing.assert_allclose(X, R)
    assert (fp.keyed.counters["keys_expired"], fp.keyed.counters["keys_evicted"]) == (ref.expired, ref.evicted)
    assert fp.keyed.store.n_keys == len(ref.keys)


def test_a_records_features_never_see_its_own_label_or_value():
    spec = _spec(windows=[{"field": "x", "type": "sliding", "size": 1000, "aggs": ["sum", "max"]}], lags={"x": 1},
                 time_features=[])
    fp = FeaturePipeline(spec, "y", label_width=2)
    recs = [{"k": "a", "ts": 10 + i, "x": 100.0 * (i + 1)} for i in range(3)]
    X = fp.transform_parsed(fp.parse(recs), labels=np.array([1.0, 0.0, 1.0]), sequential=True)
    cols = fp.keyed.columns
    get = lambda name: X[:, cols.index(name) + X.shape[1] - len(cols)].tolist()  # noqa: E731
    assert get("sliding(x,1000ms).sum") == [0.0, 100.0, 300.0]
    assert get("lag1(x)") == [0.0, 100.0, 200.0]
    assert get("label1=class1") == [0.0, 1.0, 0.0] and get("label1=class0") == [0.0, 0.0, 1.0]


def test_late_records_are_counted_kept_out_of_windows_or_dead_lettered():
    spec = _spec(windows=[{"field": "x", "type": "sliding", "size": 1000, "aggs": ["count"]}], lags={},
                 label_history=0, time_features=[], state={"allowed_lateness": 5})
    recs = [{"k": "a", "ts": 100, "x": 1}, {"k": "a", "ts": 97, "x": 1}, {"k": "a", "ts": 90, "x": 1},
            {"k": "a", "ts": 101, "x": 1}]
    fp = FeaturePipeline(spec)
    X, good, bad = fp.transform_batch(recs)
    # a sliding window ends at the record's own time (97 does not see 100); 90 < 100 - 5 is late:
    # its window ends at the oldest open time (95), and it enters no window (101 sees 100 and 97)
    assert X[:, 0].tolist() == [0.0, 0.0, 0.0, 2.0]
    assert fp.keyed.counters["late_records"] == 1 and not bad
    fp = FeaturePipeline(spec.model_copy(update={"state": spec.state.model_copy(update={"late": "dead_letter"})}))
    X, good, bad = fp.transform_batch(recs)
    assert good.tolist() == [0, 1, 3] and [(b.index, b.error_type) for b in bad] == [(2, "late_record")]


def test_bad_records_do_not_touch_the_state():
    spec = _spec(windows=[{"field": "x", "type": "sliding", "size": 1000, "aggs": ["count", "sum"]}],
                 lags={"x": 1}, label_history=0, time_features=[])
    fp = FeaturePipeline(spec)
    X, good, bad = fp.transform_batch([{"k": "a", "ts": 1, "x": 1.0}, {"k": "a", "ts": 2, "x": "oops"},
                                       {"ts": 3, "x": 2.0}, {"k": "a", "x": 2.0}, {"k": "a", "ts": 4, "x": 5.0}])
    assert good.tolist() == [0, 4]
    assert [(b.index, b.field) for b in bad] == [(1, "x"), (2, "k"), (3, "ts")]
    assert X[1, :2].tolist() == [1.0, 1.0]


def test_distinct_on_buckets_is_a_hyperloglog_estimate():
    spec = _spec(windows=[{"field": "c", "type": "tumbling", "size": 10**9, "aggs": ["distinct"]},
                          {"field": "c", "type": "sliding", "size": 10**9, "aggs": ["distinct"]}],
                 lags={}, label_history=0, time_features=[], state={"max_events": 5000})
    fp = FeaturePipeline(spec)
    recs = [{"k": "a", "ts": 1 + i, "c": f"v{i % 3000}"} for i in range(4001)]
    X, _, _ = fp.transform_batch(recs)
    approx, exact = X[-1, 0], X[-1, 1]
    assert exact == 3000 and abs(approx - 3000) / 3000 < 0.4  # 1.04 / sqrt(64) = 13% standard error


def test_state_round_trip_continues_identically():
    spec = _spec(standardize=True)
    recs = [{"k": "abc"[i % 3], "ts": 1_000 + 7 * i, "x": float(i % 5)} for i in range(300)]
    labels = np.array([float(i % 2) for i in range(300)])
    X, fp = _run(spec, recs[:200], labels[:200], 32)
    fp2 = FeaturePipeline(spec, "y", label_width=2)
    fp2.load_state_dict(fp.state_dict())
    a = fp.transform_parsed(fp.parse(recs[200:]), labels=labels[200:], sequential=True)
    b = fp2.transform_parsed(fp2.parse(recs[200:]), labels=labels[200:], sequential=True)
    np.testing.assert_array_equal(a, b)


def test_inference_without_update_changes_nothing():
    spec = _spec()
    fp = FeaturePipeline(spec, "y", label_width=2)
    recs = [{"k": "ab"[i % 2], "ts": 1_000 + i, "x": float(i)} for i in range(20)]
    fp.transform_batch(recs[:10])
    before = {k: v.copy() for k, v in fp.state_dict().items()}
    X1, _, _ = fp.transform_batch(recs[10:], update=False)
    X2, _, _ = fp.transform_batch(recs[10:], update=False)
    np.testing.assert_array_equal(X1, X2)
    after = fp.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("features, message", [
    ({"numeric": ["x"], "key": "k"}, "no stateful feature"),
    ({"windows": [{"field": "x", "type": "hopping", "size": "1h", "hop": "7m", "aggs": ["mean"]}]}, "multiple of hop"),
    ({"windows": [{"type": "sliding", "size": "1h", "aggs": ["mean"]}]}, "only count"),
    ({"windows": [{"field": "x", "size": "1 fortnight", "aggs": ["mean"]}]}, "duration"),
    ({"lags": {"x": 0}}, "1..1000"),
    ({"key": "@offset", "lags": {"x": 1}}, "'@key'"),
])
def test_spec_errors_name_the_field(features, message):
    with pytest.raises(SpecError) as err:
        parse_spec({"source": {"topic": "t"}, "features": features, "mode": "train", "label": {"field": "y"}})
    assert message in str(err.value) and "features" in str(err.value)


def test_time_features_are_cyclic_in_utc():
    spec = _spec(windows=[], lags={}, label_history=0)
    fp = FeaturePipeline(spec)
    monday_6h = 4 * 86_400_000 + 6 * 3_600_000  # 1970-01-05 06:00 UTC was a Monday
    X, _, _ = fp.transform_batch([{"k": "a", "ts": monday_6h}])
    hs, hc, ds, dc = X[0].tolist()
    assert math.isclose(hs, 1.0, abs_tol=1e-6) and math.isclose(hc, 0.0, abs_tol=1e-6)
    assert math.isclose(math.atan2(ds, dc) % (2 * math.pi) / (2 * math.pi) * 7, 0.25, abs_tol=1e-5)
