"""Export for serving from other languages: each format reproduces the live learner (no Kafka needed)."""

from __future__ import annotations

import doctest
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from river import datasets
from typer.testing import CliRunner

import tensorstream.export
import tensorstream.export.layout
from procutil import write_spec
from tensorstream.backends import make_backend
from tensorstream.checkpoint import CheckpointStore, save_state
from tensorstream.cli import app
from tensorstream.export import (
    FORMATS,
    ExportError,
    ExportMismatchError,
    encode_records,
    export_learner,
    layout_path,
    load_exported,
)
from tensorstream.learn import OnlineLearner
from tensorstream.spec import PipelineSpec

# User factories are referenced by import path, as a user's package would be (see test_backends.py).
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FACTORIES = {"torch": "tests.fixtures_models:make_torch_mlp", "tensorflow": "tests.fixtures_models:make_keras_mlp"}
ATOL = 1e-5


def phishing(n: int = 300) -> list[dict]:
    """River's Phishing dicts plus a categorical field (so the layout sidecar has a vocabulary to carry)."""
    out = []
    for i, (x, y) in enumerate(datasets.Phishing()):
        if i == n:
            break
        out.append({**x, "y": y, "browser": ("chrome", "firefox", "safari", "edge", "lynx")[i % 5]})
    return out


RECORDS = phishing()


def make_spec(backend: str, kind: str = "mlp", task: str = "classification", encoding: str = "onehot",
              name: str = "phishing-export") -> PipelineSpec:
    label = {"field": "y", "classes": [False, True]} if task == "classification" else {"field": "y", "task": task}
    return PipelineSpec.model_validate({
        "name": name, "backend": backend, "source": {"topic": "phishing"}, "sink": {"topic": "phishing.pred"},
        # 3 one-hot slots for 5 browsers: the overflow slot is used, and the sidecar must say so
        "features": {"numeric": ["*"], "categorical": ["browser"], "categorical_encoding": encoding,
                     "max_categories": 3, "hash_buckets": 8},
        "label": label,
        "model": {"kind": kind, "hidden": [16], "optimizer": {"name": "adam", "lr": 0.01}, "seed": 1},
    })


def trained(spec: PipelineSpec, records: list[dict] = RECORDS, batch: int = 50) -> OnlineLearner:
    learner = OnlineLearner(spec, make_backend(spec.backend))
    if spec.label and spec.label.task == "regression":
        records = [{**r, "y": float(r["y"]) + r["long_url"]} for r in records]
    for i in range(0, len(records), batch):
        learner.process(records[i : i + batch])
    return learner


@pytest.fixture(scope="module")
def learners() -> dict[str, OnlineLearner]:
    return {b: trained(make_spec(b)) for b in FORMATS}


def live(learner: OnlineLearner, records: list[dict]) -> np.ndarray:
    preds = learner.predict(records).predictions
    if learner.task == "regression":
        return np.array([[p["value"]] for p in preds], dtype=np.float32)
    return np.array([p["proba"] for p in preds], dtype=np.float32)


def check_against_records(fmt: str, path: Path, learner: OnlineLearner) -> dict:
    """The artefact, fed rows built from the sidecar alone, predicts what the learner predicts on records."""
    layout = json.loads(layout_path(path).read_text())
    assert layout["format"] == fmt
    run = load_exported(fmt, path, layout["input"]["name"], layout["output"]["name"])
    for n in (1, 17):  # a dynamic batch dimension
        recs = RECORDS[-n:]
        got = run(encode_records(layout, recs))
        assert got.shape == (n, layout["output"]["shape"][1])
        np.testing.assert_allclose(got, live(learner, recs), atol=ATOL)
    return layout


def test_docstring_examples():
    for module in (tensorstream.export, tensorstream.export.layout):
        assert doctest.testmod(module).failed == 0


@pytest.mark.parametrize("backend,fmt", [(b, f) for b, fmts in FORMATS.items() for f in fmts])
def test_export_matches_the_live_learner(learners, backend, fmt, tmp_path):
    learner = learners[backend]
    result = export_learner(learner, fmt, tmp_path / f"model.{fmt}", model_info={"checkpoint": "c1"})
    assert result.max_abs_diff <= ATOL and result.rows == (1, 64)
    assert result.layout_path == tmp_path / f"model.{fmt}.layout.json"
    layout = check_against_records(fmt, result.path, learner)
    assert layout["model"] == {"checkpoint": "c1"} and layout["classes"] == [False, True]
    assert [f["name"] for f in layout["numeric"]["fields"]][:2] == ["age_of_domain", "anchor_from_other_domain"]
    (browser,) = layout["categorical"]["fields"]
    assert browser["vocab"] == ["chrome", "firefox", "safari"] and browser["offset"] == 9 and browser["width"] == 4
    assert layout["input"]["shape"] == [None, 13]
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
        (inp,), (out,) = session.get_inputs(), session.get_outputs()
        assert (inp.name, inp.shape, inp.type) == ("features", ["batch", 13], "tensor(float)")
        assert (out.name, out.shape) == ("probabilities", ["batch", 2])
        meta = session.get_modelmeta().custom_metadata_map
        assert json.loads(meta["tensorstream.layout"]) == layout  # self-contained for other languages


@pytest.mark.parametrize("backend,fmt", [("torch", "onnx"), ("torch", "torchscript"),
                                         ("tensorflow", "savedmodel"), ("tensorflow", "onnx")])
def test_user_factory_models_export(backend, fmt, tmp_path):
    # Dropout (torch and keras) and an L2 regulariser (keras): inference mode must be what is exported.
    learner = trained(make_spec(backend, kind=FACTORIES[backend], encoding="hash"), RECORDS[:150])
    result = export_learner(learner, fmt, tmp_path / f"user.{fmt}")
    assert result.max_abs_diff <= ATOL
    layout = check_against_records(fmt, result.path, learner)
    assert layout["categorical"]["encoding"] == "hash" and layout["categorical"]["fields"][0]["width"] == 8


def test_export_leaves_the_live_learner_as_it_was(tmp_path):
    """Exporting (and verifying) changes no weight, statistic, vocabulary or counter of the learner."""
    spec = make_spec("torch")
    exported, untouched = trained(spec, RECORDS[:100]), trained(spec, RECORDS[:100])
    export_learner(exported, "torchscript", tmp_path / "m.pt")
    for learner in (exported, untouched):
        learner.process(RECORDS[100:150])
    a, b = exported.state_dict(), untouched.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_regression_exports_the_value(tmp_path):
    learner = trained(make_spec("torch", task="regression"), RECORDS[:100])
    result = export_learner(learner, "torchscript", tmp_path / "reg.pt")
    layout = check_against_records("torchscript", result.path, learner)
    assert layout["output"] == {"name": "prediction", "dtype": "float32", "shape": [None, 1], "softmax": False}


@pytest.mark.parametrize("backend, fmt", [("torch", "onnx"), ("tensorflow", "savedmodel")])
def test_a_standardised_regression_target_is_exported_in_its_units(backend, fmt, tmp_path):
    """label.standardize (on for an MLP): the graph ends with out * std + mean, as the live learner."""
    spec = make_spec(backend, task="regression")
    learner = OnlineLearner(spec, make_backend(backend))
    for i in range(0, 200, 50):
        learner.process([{**r, "y": 300.0 + 20 * r["long_url"]} for r in RECORDS[i:i + 50]])
    assert learner.target is not None
    result = export_learner(learner, fmt, tmp_path / ("reg.onnx" if fmt == "onnx" else "reg"))
    layout = json.loads(layout_path(result.path).read_text())
    run = load_exported(fmt, result.path, layout["input"]["name"], layout["output"]["name"])
    got = run(encode_records(layout, RECORDS[-17:]))
    np.testing.assert_allclose(got, live(learner, RECORDS[-17:]), rtol=1e-6, atol=1e-4)
    assert abs(float(got.mean()) - 300) < 100  # the target's units, not the model's


def test_builtin_model_crosses_frameworks(learners, tmp_path):
    """A torch-trained built-in MLP rebuilt on tensorflow exports a SavedModel that predicts the same."""
    torch_learner = learners["torch"]
    tf_learner = OnlineLearner(make_spec("tensorflow"), make_backend("tensorflow"))
    tf_learner.load_state_dict(torch_learner.state_dict())
    result = export_learner(tf_learner, "savedmodel", tmp_path / "sm")
    check_against_records("savedmodel", result.path, torch_learner)


def test_refusals(learners, tmp_path):
    unbuilt = OnlineLearner(make_spec("torch"), make_backend("torch"))
    with pytest.raises(ExportError, match="no model yet"):
        export_learner(unbuilt, "onnx", tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="exports savedmodel, onnx, not torchscript"):
        export_learner(learners["tensorflow"], "torchscript", tmp_path / "m.pt")
    (tmp_path / "taken.pt").write_text("mine")
    with pytest.raises(ExportError, match="exists"):
        export_learner(learners["torch"], "torchscript", tmp_path / "taken.pt")
    assert (tmp_path / "taken.pt").read_text() == "mine"


def test_a_mismatch_fails_loudly_and_leaves_nothing(learners, tmp_path, monkeypatch):
    real = tensorstream.export.load_exported

    def off_by_a_bit(*args, **kwargs):
        run = real(*args, **kwargs)
        return lambda x: run(x) + 1e-3

    monkeypatch.setattr(tensorstream.export, "load_exported", off_by_a_bit)
    out = tmp_path / "m.pt"
    with pytest.raises(ExportMismatchError, match="differs from the live torch model by up to 0.001") as err:
        export_learner(learners["torch"], "torchscript", out)
    assert err.value.max_abs_diff == pytest.approx(1e-3, rel=1e-3)
    assert not out.exists() and not (tmp_path / "m.pt.layout.json").exists()


# -- the command --------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_exports_a_checkpoint_and_a_state_file(learners, tmp_path):
    learner = learners["torch"]
    spec = make_spec("torch").model_copy(update={"state_dir": str(tmp_path / "state")})
    path = write_spec(spec, tmp_path / "spec.yaml")
    info = CheckpointStore(spec.checkpoint_url).save(
        learner.state_dict(), offsets={("phishing", 0): len(RECORDS)}, n_learned=learner.n_learned,
        backend="torch", spec_hash=spec.spec_hash())

    res = runner.invoke(app, ["export", info.id, "--spec", str(path), "--format", "onnx", "--out", "m.onnx"])
    assert res.exit_code == 0, res.output
    assert "verified: max |exported - live|" in res.output
    layout = json.loads(Path("m.onnx.layout.json").read_text())
    assert layout["model"]["checkpoint"] == info.id and layout["model"]["trained_on"] == "torch"
    check_against_records("onnx", Path("m.onnx"), learner)

    again = runner.invoke(app, ["export", info.id, "--spec", str(path), "-f", "onnx", "-o", "m.onnx"])
    assert again.exit_code == 1 and "exists" in again.output
    wrong = runner.invoke(app, ["export", info.id, "--spec", str(path), "-f", "savedmodel", "-o", "sm"])
    assert wrong.exit_code == 1 and "--backend" in wrong.output
    crossed = runner.invoke(app, ["export", info.id, "--spec", str(path), "-f", "savedmodel", "-o", "sm",
                                  "--backend", "tensorflow"])
    assert crossed.exit_code == 0, crossed.output
    check_against_records("savedmodel", Path("sm"), learner)
    neither = runner.invoke(app, ["export", "--spec", str(path), "-f", "onnx", "-o", "x.onnx"])
    assert neither.exit_code == 2

    save_state(str(tmp_path / "state.safetensors"), learner.state_dict(),
               {"backend": "torch", "spec_hash": spec.spec_hash(), "n_learned": str(learner.n_learned)})
    res = runner.invoke(app, ["export", "--state", str(tmp_path / "state.safetensors"), "--spec", str(path),
                              "--format", "torchscript", "--out", "m.pt"])
    assert res.exit_code == 0, res.output
    assert json.loads(Path("m.pt.layout.json").read_text())["model"]["n_learned"] == str(learner.n_learned)


def test_cli_refuses_a_checkpoint_of_another_spec(learners, tmp_path):
    spec = make_spec("torch").model_copy(update={"state_dir": str(tmp_path / "state")})
    info = CheckpointStore(spec.checkpoint_url).save(
        learners["torch"].state_dict(), offsets={}, n_learned=1, backend="torch", spec_hash="0" * 16)
    path = write_spec(spec, tmp_path / "spec.yaml")
    res = runner.invoke(app, ["export", info.id, "--spec", str(path), "-f", "onnx", "-o", "m.onnx"])
    assert res.exit_code == 1 and "another model/feature spec" in res.output
