"""features/: record -> array transforms, label encoding, checkpointable state."""

from __future__ import annotations

import doctest
import math
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

import tensorstream.features.labels
import tensorstream.features.records
import tensorstream.features.scaler
import tensorstream.features.state
import tensorstream.features.transform
from tensorstream.features import BadRecord, FeaturePipeline, LabelEncoder, RunningStandardizer, stable_bucket
from tensorstream.spec import FeatureSpec, LabelSpec


def fs(**kw) -> FeatureSpec:
    return FeatureSpec(**kw)


def through_safetensors(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Checkpoints are safetensors: the state must survive it (numeric arrays only)."""
    for k, v in state.items():
        assert isinstance(v, np.ndarray) and v.dtype != object, k
    return st_load(st_save(state))


@pytest.mark.parametrize(
    "module",
    [
        tensorstream.features.transform,
        tensorstream.features.labels,
        tensorstream.features.records,
        tensorstream.features.scaler,
        tensorstream.features.state,
    ],
)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


# ----------------------------------------------------------------- numeric


def test_wildcard_layout_is_sorted_excludes_label_and_categoricals_and_is_fixed():
    fp = FeaturePipeline(fs(numeric=["*"], categorical=["c"]), label_field="y")
    assert fp.n_features is None  # unknown until the first record
    recs = [{"z": 1, "a": 2.5, "flag": True, "c": 3, "y": 1, "s": "text", 7: 1.0}]
    X, good, bad = fp.transform_batch(recs, update=False)
    assert fp.numeric_fields == ["a", "flag", "z"]
    assert fp.n_features == 3 + 33
    # later records: extra fields ignored, a missing one is a bad record
    X, good, bad = fp.transform_batch(
        [{"a": 1.0, "flag": False, "z": 2, "c": "x", "new": 5.0}, {"a": 1.0, "z": 2, "c": "x"}], update=True
    )
    assert good.tolist() == [0]
    assert [(b.index, b.error_type, b.field) for b in bad] == [(1, "missing_field", "flag")]
    assert "'flag'" in bad[0].message
    assert fp.numeric_fields == ["a", "flag", "z"]


def test_explicit_n_features_known_from_the_spec():
    fp = FeaturePipeline(fs(numeric=["a", "b"], categorical=["c", "d"], max_categories=4), "y")
    assert fp.n_features == 2 + 2 * 5
    fp = FeaturePipeline(fs(numeric=["a"], categorical=["c"], categorical_encoding="hash", hash_buckets=8))
    assert fp.n_features == 1 + 8
    fp = FeaturePipeline(fs(categorical=["c"], max_categories=3))
    assert fp.n_features == 4


def test_welford_matches_numpy_over_batches_and_standardizes():
    rng = np.random.default_rng(0)
    data = rng.normal(loc=[5.0, -3.0], scale=[2.0, 0.1], size=(300, 2))
    fp = FeaturePipeline(fs(numeric=["a", "b"]), "y")
    for i in range(0, 300, 37):
        X, _, _ = fp.transform_batch([{"a": a, "b": b} for a, b in data[i : i + 37]], update=True)
    st = fp.state_dict()
    assert st["scaler/mean"].dtype == np.float64
    np.testing.assert_allclose(st["scaler/mean"], data.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(st["scaler/m2"] / st["scaler/count"], data.var(axis=0), rtol=1e-10)
    assert st["scaler/count"].tolist() == [300.0, 300.0]
    X, _, _ = fp.transform_batch([{"a": a, "b": b} for a, b in data], update=False)
    assert X.dtype == np.float32
    np.testing.assert_allclose(X.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(X.std(axis=0), 1.0, atol=1e-5)


def test_stats_update_before_transform_and_not_at_inference():
    fp = FeaturePipeline(fs(numeric=["a"]))
    X, _, _ = fp.transform_batch([{"a": 1.0}, {"a": 3.0}], update=True)
    assert X[:, 0].tolist() == [-1.0, 1.0]  # the batch's own statistics are used
    before = fp.state_dict()
    fp.transform_batch([{"a": 100.0}], update=False)
    after = fp.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    # a constant feature is centred, never divided by zero
    fp = FeaturePipeline(fs(numeric=["a"]))
    X, _, _ = fp.transform_batch([{"a": 4.0}, {"a": 4.0}], update=True)
    assert X.tolist() == [[0.0], [0.0]]


def test_standardize_false_passes_raw_values():
    fp = FeaturePipeline(fs(numeric=["a"], standardize=False))
    X, _, _ = fp.transform_batch([{"a": 7}, {"a": True}], update=True)
    assert X.tolist() == [[7.0], [1.0]]


def test_bad_records_are_reported_with_the_field_and_do_not_touch_state():
    fp = FeaturePipeline(fs(numeric=["a", "b"], categorical=["c"]), "y")
    recs = [
        {"a": 1.0, "b": 2.0, "c": "x"},
        {"a": "1.0", "b": 2.0, "c": "x"},  # string number
        {"a": float("nan"), "b": 2.0, "c": "x"},
        {"a": 1.0, "b": math.inf, "c": "x"},
        {"a": 1.0, "c": "x"},
        {"a": None, "b": 1.0, "c": "x"},
        {"a": 1.0, "b": 2.0, "c": ["list"]},
        {"a": 1.0, "b": 2.0, "c": float("nan")},
        "not a record",
        {"a": 3.0, "b": 4.0, "c": "y"},
    ]
    X, good, bad = fp.transform_batch(recs, update=True)
    assert good.tolist() == [0, 9]
    got = [(b.index, b.error_type, b.field) for b in bad]
    assert got == [
        (1, "wrong_type", "a"),
        (2, "non_finite", "a"),
        (3, "non_finite", "b"),
        (4, "missing_field", "b"),
        (5, "missing_field", "a"),
        (6, "wrong_type", "c"),
        (7, "non_finite", "c"),
        (8, "not_a_record", None),
    ]
    for b in bad:
        assert isinstance(b, BadRecord)
        if b.field:
            assert f"'{b.field}'" in b.message
    assert fp.state_dict()["scaler/count"].tolist() == [2.0, 2.0]  # only the good rows
    assert sorted(fp._vocab["c"]) == ["x", "y"]


def test_all_bad_batch_and_empty_batch():
    fp = FeaturePipeline(fs(numeric=["a"]))
    X, good, bad = fp.transform_batch([{"b": 1}], update=True)
    assert X.shape == (0, 1) and good.tolist() == [] and len(bad) == 1
    X, good, bad = fp.transform_batch([], update=True)
    assert X.shape == (0, 1) and bad == []


# ------------------------------------------------------------------ arrays


def test_bare_array_records():
    fp = FeaturePipeline(fs(numeric=["*"], standardize=False))
    recs = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(6), np.ones(5), {"a": 1.0}, np.array(["a"] * 6)]
    X, good, bad = fp.transform_batch(recs, update=True)
    assert fp.n_features == 6
    assert X[0].tolist() == [0, 1, 2, 3, 4, 5] and good.tolist() == [0, 1]
    assert [(b.index, b.error_type) for b in bad] == [(2, "wrong_shape"), (3, "wrong_shape"), (4, "wrong_type")]
    nan = np.ones(6)
    nan[2] = np.nan
    assert fp.transform_batch([nan], update=True)[2][0].error_type == "non_finite"


def test_array_valued_fields_are_flattened_in_place():
    fp = FeaturePipeline(fs(numeric=["x", "t"], standardize=False), label_field="y")
    recs = [
        {"x": np.array([1.0, 2.0, 3.0], dtype=np.float32), "t": 9, "y": np.int64(1)},
        {"x": [4, 5, 6], "t": 8.0},  # a JSON list is an array too
        {"x": [1, 2], "t": 8.0},
        {"x": [1, "a", 2], "t": 8.0},
    ]
    X, good, bad = fp.transform_batch(recs, update=True)
    assert fp.n_features == 4
    assert X.tolist() == [[1, 2, 3, 9], [4, 5, 6, 8]]
    assert [(b.index, b.error_type, b.field) for b in bad] == [(2, "wrong_shape", "x"), (3, "wrong_type", "x")]
    # "*" picks numeric arrays too, not the label
    fp = FeaturePipeline(fs(numeric=["*"], standardize=False), label_field="y")
    fp.transform_batch(recs[:1], update=True)
    assert fp.numeric_fields == ["t", "x"] and fp.n_features == 4


# ------------------------------------------------------------- categorical


def test_onehot_growing_vocabulary_with_overflow_slot():
    fp = FeaturePipeline(fs(categorical=["c"], max_categories=2))
    X, _, _ = fp.transform_batch([{"c": "a"}, {"c": "b"}, {"c": "a"}, {"c": "z"}], update=True)
    assert X.tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]]
    # ints and integral floats are one category; bools are their own
    fp = FeaturePipeline(fs(categorical=["c"], max_categories=4))
    X, _, _ = fp.transform_batch([{"c": 3}, {"c": 3.0}, {"c": "3"}, {"c": True}], update=True)
    assert X.argmax(axis=1).tolist() == [0, 0, 0, 1]


def test_onehot_unseen_value_at_inference_is_all_zeros_until_the_vocabulary_is_full():
    fp = FeaturePipeline(fs(categorical=["c"], max_categories=2))
    fp.transform_batch([{"c": "a"}], update=True)
    X, _, _ = fp.transform_batch([{"c": "new"}], update=False)
    assert X.tolist() == [[0, 0, 0]] and len(fp._vocab["c"]) == 1
    fp.transform_batch([{"c": "b"}], update=True)
    X, _, _ = fp.transform_batch([{"c": "new"}], update=False)
    assert X.tolist() == [[0, 0, 1]]


def test_hashing_is_stable_crc32_and_independent_of_python_hash_seed():
    fp = FeaturePipeline(fs(categorical=["c", "d"], categorical_encoding="hash", hash_buckets=16))
    X, _, _ = fp.transform_batch([{"c": "red", "d": 42}], update=True)
    assert X.shape == (1, 32)
    assert np.flatnonzero(X[0]).tolist() == [zlib.crc32(b"red") % 16, 16 + zlib.crc32(b"42") % 16]
    code = "from tensorstream.features import stable_bucket; print(stable_bucket('red', 1000003))"
    outs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": os.pathsep.join(sys.path)}
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    assert outs == {f"{stable_bucket('red', 1000003)}\n"}


def test_categorical_with_array_record_is_bad():
    fp = FeaturePipeline(fs(numeric=["*"], categorical=["c"]))
    _, good, bad = fp.transform_batch([np.ones(3)], update=True)
    assert len(good) == 0 and bad[0].error_type == "wrong_type"


# ------------------------------------------------------------------ state


def test_state_roundtrip_gives_identical_transforms():
    spec = fs(numeric=["*"], categorical=["c"], max_categories=3)
    rng = np.random.default_rng(1)
    recs = [{"a": float(rng.normal()), "b": int(rng.integers(10)), "c": str(rng.integers(5)), "y": 1} for _ in range(50)]
    fp = FeaturePipeline(spec, "y")
    fp.transform_batch(recs[:30], update=True)
    state = through_safetensors(fp.state_dict())
    assert state["vocab"].dtype == np.uint8
    fp2 = FeaturePipeline(spec, "y")
    fp2.load_state_dict(state)
    assert fp2.numeric_fields == ["a", "b"] and fp2.n_features == fp.n_features
    for update in (True, False):
        X1, g1, _ = fp.transform_batch(recs[30:], update=update)
        X2, g2, _ = fp2.transform_batch(recs[30:], update=update)
        np.testing.assert_array_equal(X1, X2)
    # an unfixed layout round-trips too
    fresh = FeaturePipeline(spec, "y")
    fresh.load_state_dict(through_safetensors(FeaturePipeline(spec, "y").state_dict()))
    assert fresh.n_features is None


def test_state_from_another_spec_is_refused():
    fp = FeaturePipeline(fs(numeric=["a"]))
    fp.transform_batch([{"a": 1.0}])
    with pytest.raises(ValueError, match="max_categories"):
        FeaturePipeline(fs(numeric=["a"], max_categories=5)).load_state_dict(fp.state_dict())


def test_label_cannot_be_a_feature():
    with pytest.raises(ValueError, match="label field"):
        FeaturePipeline(fs(numeric=["a", "y"]), label_field="y")


def test_running_standardizer_state_shape_check():
    s = RunningStandardizer(2)
    with pytest.raises(ValueError, match="shape"):
        s.load_state_dict({"count": np.zeros(3), "mean": np.zeros(3), "m2": np.zeros(3)})


# ------------------------------------------------------------------ labels


def test_labels_compare_by_value():
    enc = LabelEncoder(LabelSpec(field="y", classes=[False, True]))
    y, good, bad = enc.encode_batch(
        [{"y": True}, {"y": 1}, {"y": 0.0}, {"y": np.bool_(False)}, {"y": "1"}, {"y": "true"}, {"y": 2}]
    )
    assert y.dtype == np.int64 and y.tolist() == [1, 1, 0, 0]
    assert good.tolist() == [0, 1, 2, 3]
    assert [(b.index, b.error_type, b.field) for b in bad] == [(i, "unknown_label", "y") for i in (4, 5, 6)]
    assert "'y'" in bad[0].message
    assert [enc.decode(i) for i in (0, 1)] == [False, True]  # the spec's own values
    enc = LabelEncoder(LabelSpec(field="y", classes=["no", "yes"]))
    assert enc.encode_batch([{"y": "yes"}, {"y": 1}])[0].tolist() == [1]


def test_equal_classes_by_value_are_refused():
    with pytest.raises(ValueError, match="distinct"):  # the spec refuses it already
        LabelEncoder(LabelSpec(field="y", classes=[0, False]))


def test_growing_classes_up_to_max():
    enc = LabelEncoder(LabelSpec(field="label", max_classes=3))
    y, good, bad = enc.encode_batch([{"label": "b"}, {"label": "a"}, {"label": "b"}, {"label": "c"}, {"label": "d"}])
    assert y.tolist() == [0, 1, 0, 2] and enc.classes == ["b", "a", "c"]
    assert bad[0].index == 4 and bad[0].error_type == "too_many_classes"
    assert enc.decode(2) == "c" and enc.decode(5) is None and enc.n_outputs == 3
    # no growth without update
    enc = LabelEncoder(LabelSpec(field="label", max_classes=3))
    _, _, bad = enc.encode_batch([{"label": "b"}], update=False)
    assert bad[0].error_type == "unknown_label" and enc.classes == []


def test_label_errors():
    enc = LabelEncoder(LabelSpec(field="y", max_classes=5))
    _, good, bad = enc.encode_batch([{"y": [1]}, {"y": float("nan")}, {"y": None}, {}, np.ones(2), {"y": 3}])
    assert good.tolist() == [5]
    assert [b.error_type for b in bad] == ["wrong_type", "non_finite", "missing_field", "missing_field", "missing_field"]


def test_regression_labels():
    enc = LabelEncoder(LabelSpec(field="t", task="regression"))
    y, good, bad = enc.encode_batch([{"t": 1}, {"t": 2.5}, {"t": "3"}, {"t": math.inf}])
    assert y.dtype == np.float32 and y.tolist() == [1.0, 2.5]
    assert [b.error_type for b in bad] == ["wrong_type", "non_finite"]
    assert enc.n_outputs == 1


def test_label_state_roundtrip():
    enc = LabelEncoder(LabelSpec(field="y", max_classes=4))
    enc.encode_batch([{"y": "cat"}, {"y": 2}, {"y": True}])
    state = through_safetensors(enc.state_dict())
    enc2 = LabelEncoder(LabelSpec(field="y", max_classes=4))
    enc2.load_state_dict(state)
    assert enc2.classes == ["cat", 2, True]
    assert [type(c) for c in enc2.classes] == [str, int, bool]  # JSON keeps the types
    assert enc2.encode_batch([{"y": 1}, {"y": "cat"}])[0].tolist() == [2, 0]
    fixed = LabelEncoder(LabelSpec(field="y", classes=[0, 1]))
    with pytest.raises(ValueError, match="classes"):
        fixed.load_state_dict(state)


# ------------------------------------------------- columnar extraction, dotted paths

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tensorstream.features.columns import FieldPath  # noqa: E402

_MISSING = object()
_NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64), st.integers(-(10**40), 10**40), st.booleans(),
    st.floats(min_value=-1e6, max_value=1e6).map(np.float32), st.integers(-5, 5).map(np.int64),
)
_VALUES = st.one_of(_NUMBERS, st.text(max_size=3), st.none(), st.just(_MISSING), st.lists(st.integers(0, 3), max_size=2))
_CATS = st.one_of(st.sampled_from(["red", "blue", "green", "x.y"]), st.integers(-3, 3), st.booleans(),
                  st.floats(-3, 3), st.none(), st.just(_MISSING))


def _record(a, b, v, c) -> dict:
    rec = {"a": a, "b": b, "u": {"v": v}, "c": c, "y": 1}
    return {k: (val if not isinstance(val, dict) else {kk: vv for kk, vv in val.items() if vv is not _MISSING})
            for k, val in rec.items() if val is not _MISSING}


def _reference_transform(fp: FeaturePipeline, parsed, update: bool) -> np.ndarray:
    """The per-row transform as it was before the vectorised one (the reference)."""
    s = fp.spec
    n, d = len(parsed), fp._scaler.n_features
    X = np.zeros((n, fp.n_features), dtype=np.float32)
    if update:
        fp._scaler.update(parsed.numeric)
    X[:, :d] = fp._scaler.transform(parsed.numeric) if s.standardize else parsed.numeric
    for j, name in enumerate(s.categorical):
        base, vocab = d + j * (s.max_categories + 1), fp._vocab[name]
        for r in range(n):
            key = parsed.categories[r][j]
            slot = vocab.get(key)
            if slot is None:
                if len(vocab) >= s.max_categories:
                    slot = s.max_categories
                elif update:
                    slot = vocab[key] = len(vocab)
                else:
                    continue
            X[r, base + slot] = 1.0
    return X


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_VALUES, _VALUES, _VALUES, _CATS), min_size=1, max_size=12), st.booleans())
def test_columnar_parse_and_transform_equal_the_per_record_path(rows, update):
    spec = fs(numeric=["a", "b", "u.v"], categorical=["c"], max_categories=2)
    fast, slow = FeaturePipeline(spec, "y"), FeaturePipeline(spec, "y")
    first = [{"a": 1.0, "b": 2, "u": {"v": 0.5}, "c": "red", "y": 0}]
    for fp in (fast, slow):
        fp.transform_batch(first, update=True)  # fixes the layout
    records = [_record(*r) for r in rows]
    got, want = fast.parse(records), slow._parse_rows(records, range(len(records)))
    assert got.good_idx.tolist() == want.good_idx.tolist()
    assert [b.to_dict() for b in got.bad] == [b.to_dict() for b in want.bad]
    np.testing.assert_array_equal(got.numeric, want.numeric)
    assert [list(c) for c in got.categories] == [list(c) for c in want.categories]
    X = fast.transform_parsed(got, update=update)
    np.testing.assert_array_equal(X, _reference_transform(slow, want, update))
    assert fast.state_dict().keys() == slow.state_dict().keys()
    for k, v in fast.state_dict().items():
        np.testing.assert_array_equal(v, slow.state_dict()[k])


def test_hashed_categoricals_and_array_records_take_the_fast_path_with_the_same_result():
    spec = fs(numeric=["a"], categorical=["c"], categorical_encoding="hash", hash_buckets=8)
    fp = FeaturePipeline(spec)
    recs = [{"a": float(i), "c": ["x", "y", 3][i % 3]} for i in range(9)]
    X, good, bad = fp.transform_batch(recs, update=True)
    assert not bad and good.tolist() == list(range(9))
    for r, row in zip(recs, X, strict=True):
        assert row[1 + stable_bucket(str(r["c"]), 8)] == 1.0 and row[1:].sum() == 1.0
    arr = FeaturePipeline(fs(numeric=["*"]))
    frames = [np.arange(3, dtype=np.float32) + i for i in range(4)] + [np.array([1.0, np.inf, 0.0])]
    X, good, bad = arr.transform_batch(frames, update=False)
    assert good.tolist() == [0, 1, 2, 3] and [(b.index, b.error_type) for b in bad] == [(4, "non_finite")]


def test_dotted_paths_reach_into_nested_records_and_a_literal_key_wins():
    fp = FeaturePipeline(fs(numeric=["user.age", "score"], categorical=["user.country"], standardize=False),
                         label_field="label.value")
    recs = [
        {"user": {"age": 41, "country": "fr"}, "score": 1.5, "label": {"value": 1}},
        {"user.age": 7, "user": {"age": 99, "country": "de"}, "score": 0.0},  # the literal key wins
        {"user": {"country": "fr"}, "score": 2.0},  # no age
        {"user": "not a mapping", "score": 2.0},
    ]
    X, good, bad = fp.transform_batch(recs, update=True)
    assert good.tolist() == [0, 1] and X[:, :2].tolist() == [[41.0, 1.5], [7.0, 0.0]]
    assert [(b.index, b.error_type, b.field) for b in bad] == [(2, "missing_field", "user.age"),
                                                               (3, "missing_field", "user.age")]
    enc = LabelEncoder(LabelSpec(field="label.value", classes=[0, 1]))
    y, good, bad = enc.encode_batch(recs)
    assert y.tolist() == [1] and good.tolist() == [0] and bad[0].error_type == "missing_field"
    assert FieldPath("a..b").dotted is False and FieldPath("plain").dotted is False
    with pytest.raises(ValueError, match="cannot also be a feature"):
        FeaturePipeline(fs(numeric=["label.value"]), label_field="label.value")


def test_running_standardizer_per_row_equals_one_update_per_row():
    rng = np.random.default_rng(1)
    x = rng.normal(1e3, 5.0, size=(300, 3))
    one, rows = RunningStandardizer(3), RunningStandardizer(3)
    want = []
    for i in range(300):
        one.update(x[i:i + 1])
        want.append(one.transform(x[i:i + 1])[0])
    got = []
    for i in range(0, 300, 64):
        mean, std = rows.running(x[i:i + 64])
        got.append((x[i:i + 64] - mean[1:]) / std[1:])
    np.testing.assert_allclose(np.concatenate(got), np.array(want), rtol=0, atol=1e-12)
    np.testing.assert_allclose(rows.m2, one.m2, rtol=1e-12)
    assert rows.count.tolist() == [300.0] * 3


def test_plain_json_records_never_take_the_per_record_path(monkeypatch):
    fp = FeaturePipeline(fs(numeric=["a", "n.b"], categorical=["c"]), "y")
    fp.transform_batch([{"a": 1.0, "n": {"b": 2}, "c": "x", "y": 0}], update=True)

    def per_record(*args):
        raise AssertionError("the fast path should have taken these")

    monkeypatch.setattr(fp, "_parse_rows", per_record)
    X, good, bad = fp.transform_batch([{"a": i, "n": {"b": 0.5 * i}, "c": ["x", 7][i % 2], "y": 1}
                                       for i in range(50)], update=True)
    assert good.tolist() == list(range(50)) and not bad


def test_label_batches_take_the_column_path_with_the_record_by_record_result(monkeypatch):
    """Known classes (by value: True == 1 == 1.0) and plain regression numbers in one pass; anything
    else (a new class, NaN, a string, a missing label, numpy values) record by record, reported as before."""
    fixed = LabelSpec(field="y", classes=[False, True])
    recs = [{"y": v} for v in (True, False, 1, 0, 1.0, True)]
    enc = LabelEncoder(fixed)
    monkeypatch.setattr(enc, "_encode_rows", lambda *a: pytest.fail("the column path should take these"))
    assert enc.encode_batch(recs)[0].tolist() == [1, 0, 1, 0, 1, 1]
    reg = LabelSpec(field="y", task="regression")
    assert LabelEncoder(reg).encode_batch([{"y": v} for v in (1, 2.5, True)])[0].tolist() == [1.0, 2.5, 1.0]
    for bad in ({"y": 2}, {"y": "1"}, {"y": None}, {}, {"y": float("nan")}, {"y": np.int64(1)}):
        got = LabelEncoder(fixed).encode_batch(recs + [bad])
        want = LabelEncoder(fixed)._encode_rows(recs + [bad], range(7), True)
        assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()
        assert [b.to_dict() for b in got[2]] == [b.to_dict() for b in want[2]], bad
    for bad in ({"y": "3"}, {"y": float("inf")}, {"y": 1e39}):
        got = LabelEncoder(reg).encode_batch([{"y": 1}, bad])
        assert got[1].tolist() == [0] and got[2][0].index == 1
