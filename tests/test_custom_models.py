"""Your own model: the guide's factories run as written, from the current directory, and every factory
mistake stops ``run`` before it connects, in seconds, with one sentence naming ``model.kind``."""

from __future__ import annotations

import doctest
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tensorstream.backends import ModelCheckError, check_model
from tensorstream.backends.check import load_factory
from tensorstream.cli import app
from tensorstream.data.produce import produce_records
from tensorstream.spec import SpecError, parse_spec

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "custom-models.md"
runner = CliRunner()


def guide_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", GUIDE.read_text(), flags=re.S)


def guide_files() -> dict[str, str]:
    """The guide's Python and YAML blocks that start with a ``# file.ext`` comment, by file name."""
    files = {}
    for block in guide_blocks("python") + guide_blocks("yaml"):
        first = block.splitlines()[0]
        if m := re.fullmatch(r"# (\S+\.(?:py|yaml))", first):
            files[m.group(1)] = block
    return files


@pytest.fixture
def clean_imports(monkeypatch):
    """Factories load into this process: leave sys.path (the cwd is appended) and sys.modules as they were."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("mistake_", "guide_", "cwd_")):
            del sys.modules[name]


def _spec_data(topic: str, name: str, backend: str, kind: str, tmp_path: Path, **extra) -> dict:
    data = yaml.safe_load(guide_files()["my_pipeline.yaml"])
    data.update(name=name, backend=backend, state_dir=str(tmp_path / "state"))
    data["source"] = {"topic": topic}
    data["sink"] = {"topic": f"{topic}.predictions"}
    data["model"]["kind"] = kind
    data["batch"] = {"max_size": 32}
    data.update(extra)
    return data


def _write(tmp_path: Path, data: dict) -> str:
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("backend, module", [("torch", "torch_model"), ("tensorflow", "keras_model")])
def test_the_guides_factories_run_from_the_current_directory(backend, module, broker, kafka_config, topic_factory,
                                                             tmp_path):
    files = guide_files()
    assert {"torch_model.py", "keras_model.py", "my_pipeline.yaml"} <= set(files)
    (tmp_path / f"{module}.py").write_text(files[f"{module}.py"])
    topic = topic_factory(1, prefix=f"guide-{backend}")
    produce_records(kafka_config, "river:Phishing", topic, limit=300)
    spec = _write(tmp_path, _spec_data(topic, f"guide-{backend}-{topic[-6:]}", backend, f"{module}:make", tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT / "src")  # tensorstream itself; the factory's folder is only the cwd
    # -P: no script folder or cwd on sys.path, as with the installed `tensorstream` command
    p = subprocess.run([sys.executable, "-P", "-m", "tensorstream", "run", spec, "-b", broker.bootstrap_servers,
                        "--until-end", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["records"] == 300 and result["metrics"]["accuracy"] > 0.6, result
    assert "Traceback" not in p.stderr and "oneDNN" not in p.stderr and "WARNING" not in p.stderr, p.stderr


TORCH_HEAD = "import torch\nfrom torch import nn\n\n"
KERAS_HEAD = "import keras\n\n"

MISTAKES = [
    # (case, backend, module source or None (no module), factory, expected message part)
    ("missing", "torch", None, "make", "cannot import module 'mistake_missing': no such module in the current "
                                       "directory"),
    ("syntax", "torch", "def make(:\n", "make", "importing it raised SyntaxError"),
    ("dependency", "torch", "import not_installed_pkg_x\n", "make",
     "it imports 'not_installed_pkg_x', which is not installed"),
    ("attribute", "torch", "x = 1\n", "make", "has no attribute 'make'"),
    ("not_callable", "torch", "make = 42\n", "make", "'make' is not callable"),
    ("signature", "torch", "def make(n_in, n_out):\n    pass\n", "make",
     "make(n_in, n_out) cannot be called as make(n_features=..., n_outputs=...)"),
    ("wrong_type", "torch", "def make(n_features, n_outputs):\n    return {}\n", "make",
     "must return a torch.nn.Module, got dict"),
    ("other_framework", "torch", KERAS_HEAD + "def make(n_features, n_outputs):\n"
     "    return keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(n_outputs)])\n", "make",
     "got Sequential (a Keras model: use backend: tensorflow)"),
    ("one_output", "torch", TORCH_HEAD + "def make(n_features, n_outputs):\n    return nn.Linear(n_features, 1)\n",
     "make", "output has shape (16, 1) for a batch of 16 rows of 8 features, expected (16, 2)"),
    ("softmax", "torch", TORCH_HEAD + "def make(n_features, n_outputs):\n"
     "    return nn.Sequential(nn.Linear(n_features, 8), nn.ReLU(), nn.Linear(8, n_outputs), nn.Softmax(dim=1))\n",
     "make", "the model ends in nn.Softmax(); remove it"),
    ("log_softmax", "torch", TORCH_HEAD + "class Net(nn.Module):\n"
     "    def __init__(self, d, k):\n        super().__init__()\n        self.fc = nn.Linear(d, k)\n\n"
     "    def forward(self, x):\n        return torch.log_softmax(self.fc(x), dim=1)\n\n\n"
     "def make(n_features, n_outputs):\n    return Net(n_features, n_outputs)\n",
     "make", "the model outputs log-probabilities (a log-softmax)"),
    ("keras_softmax", "tensorflow", KERAS_HEAD + "def make(n_features, n_outputs):\n"
     "    return keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(n_outputs, activation='softmax')])\n",
     "make", "ends in activation='softmax' on its last layer"),
    ("keras_functional_sigmoid", "tensorflow", KERAS_HEAD + "def make(n_features, n_outputs):\n"
     "    x = keras.Input((n_features,))\n"
     "    return keras.Model(x, keras.layers.Dense(n_outputs, activation='sigmoid')(keras.layers.Dense(8)(x)))\n",
     "make", "ends in activation='sigmoid' on its last layer"),
]


@pytest.mark.parametrize("case, backend, source, factory, expected", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_factory_mistake_stops_run_before_it_connects(case, backend, source, factory, expected, tmp_path,
                                                        clean_imports):
    module = f"mistake_{case}"
    if source is not None:
        (tmp_path / f"{module}.py").write_text(source)  # the cwd (conftest): found without PYTHONPATH
    spec = _write(tmp_path, _spec_data("never-read", f"mistake-{case}", backend, f"{module}:{factory}", tmp_path))
    t = time.monotonic()
    res = runner.invoke(app, ["run", spec, "-b", "127.0.0.1:1", "--until-end"])  # no broker: checked before
    took = time.monotonic() - t
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"model.kind '{module}:{factory}'" in errors[0], res.output
    assert expected in errors[0], errors[0]
    assert "Traceback" not in res.output and "127.0.0.1:1" not in res.output
    assert took < 15, took


def test_a_width_problem_warns_before_the_start_and_fails_at_the_first_record(broker, kafka_config, topic_factory,
                                                                               tmp_path, clean_imports):
    (tmp_path / "cwd_fixed_width.py").write_text(
        TORCH_HEAD + "def make(n_features, n_outputs):\n    return nn.Linear(10, n_outputs)  # ignores n_features\n")
    topic = topic_factory(1, prefix="width")
    produce_records(kafka_config, "river:Phishing", topic, limit=100)
    spec = _write(tmp_path, _spec_data(topic, f"width-{topic[-6:]}", "torch", "cwd_fixed_width:make", tmp_path))
    res = runner.invoke(app, ["run", spec, "-b", broker.bootstrap_servers, "--until-end"])
    assert res.exit_code == 2, res.output
    warning = next(line for line in res.output.splitlines() if "WARNING" in line)
    assert "a batch of 16 rows of 8 features" in warning and "a stand-in: numeric: ['*']" in warning
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the model raised RuntimeError on a batch of 16 rows of 9 features" in errors[0]
    assert "Traceback" not in res.output


def test_outputs_like_a_sigmoid_are_a_warning_and_the_run_goes_on(broker, kafka_config, topic_factory, tmp_path,
                                                                 clean_imports):
    (tmp_path / "cwd_sigmoid.py").write_text(
        TORCH_HEAD + "class Net(nn.Module):\n    def __init__(self, d, k):\n        super().__init__()\n"
        "        self.fc = nn.Linear(d, k)\n\n    def forward(self, x):\n        return torch.sigmoid(self.fc(x))\n\n\n"
        "def make(n_features, n_outputs):\n    return Net(n_features, n_outputs)\n")
    topic = topic_factory(1, prefix="sigmoid")
    produce_records(kafka_config, "river:Phishing", topic, limit=100)
    spec = _write(tmp_path, _spec_data(topic, f"sigmoid-{topic[-6:]}", "torch", "cwd_sigmoid:make", tmp_path))
    res = runner.invoke(app, ["run", spec, "-b", broker.bootstrap_servers, "--until-end", "--json"])
    assert res.exit_code == 0, res.output
    assert "every output for a batch of random features lies in (0, 1), as after a sigmoid" in res.output
    assert json.loads(res.stdout)["records"] == 100


def _spec(kind: str, backend: str = "torch", task: str = "classification", **features):
    label = {"field": "y", "task": task} if task == "regression" else {"field": "y", "classes": [0, 1, 2]}
    return parse_spec({"backend": backend, "source": {"topic": "t"}, "sink": {"topic": "p"},
                       "features": features or {"numeric": ["a", "b", "c"]}, "label": label,
                       "model": {"kind": kind}})


def test_check_model_from_python(tmp_path, clean_imports):
    (tmp_path / "cwd_lib.py").write_text(
        TORCH_HEAD + "def logits(n_features, n_outputs):\n    return nn.Linear(n_features, n_outputs)\n\n\n"
        "def one(n_features, n_outputs):\n    return nn.Linear(n_features, 1)\n\n\n"
        "def bounded(n_features, n_outputs):\n    return nn.Sequential(nn.Linear(n_features, n_outputs), nn.Sigmoid())\n")
    assert check_model(_spec("cwd_lib:logits")) == []
    assert check_model(_spec("mlp")) == []  # built-in: nothing to check
    # a regression may end in a sigmoid (a target in [0, 1]); a classification may not
    assert check_model(_spec("cwd_lib:bounded", task="regression")) == []
    with pytest.raises(ModelCheckError, match=r"ends in nn.Sigmoid\(\)"):
        check_model(_spec("cwd_lib:bounded"))
    # the listed fields give the width: 3 numeric + 2 categorical fields x (4 + 1 overflow) slots
    with pytest.raises(ModelCheckError, match=r"shape \(16, 1\) for a batch of 16 rows of 13 features, "
                                               r"expected \(16, 3\)"):
        check_model(_spec("cwd_lib:one", numeric=["a", "b", "c"], categorical=["d", "e"], max_categories=4))


def test_the_current_directory_is_searched_after_the_installed_packages(tmp_path, clean_imports):
    (tmp_path / "cwd_found.py").write_text("def make(n_features, n_outputs):\n    return None\n")
    sys.path[:] = [p for p in sys.path if p not in ("", str(tmp_path), ".")]
    assert callable(load_factory("cwd_found:make"))
    assert sys.path[-1] == str(tmp_path)  # appended: an installed package of the same name would win
    (tmp_path / "json.py").write_text("make = None\n")  # never shadows the standard library's json
    with pytest.raises(ImportError, match="has no attribute 'make'"):
        load_factory("json:make")


def test_doctests():
    import tensorstream
    import tensorstream.backends.check
    import tensorstream.backends.frameworks

    for module in (tensorstream, tensorstream.backends.check, tensorstream.backends.frameworks):
        assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0, module.__name__


def test_a_framework_that_is_not_installed_is_one_sentence(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else real(name, *a))
    with pytest.raises(SpecError, match=r"^backend 'tensorflow' needs 'tensorflow', which is not installed: "
                                        r"pip install 'tensorstream\[tensorflow\]'$"):
        check_model(_spec("mlp", backend="tensorflow"))  # a built-in model too: nothing is imported to tell
