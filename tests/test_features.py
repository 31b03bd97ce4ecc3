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
