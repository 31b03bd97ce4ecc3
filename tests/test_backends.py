"""The framework backends: one protocol, the same numbers in torch and tensorflow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tensorstream.backends import BACKENDS, Backend, make_backend
from tensorstream.spec import ModelSpec

# User factories are referenced by import path ("tests.fixtures_models:..."),
# exactly as a user's package would be: the repository root must be importable.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N_FEATURES = 5
FACTORIES = {"torch": "tests.fixtures_models:make_torch_mlp", "tensorflow": "tests.fixtures_models:make_keras_mlp"}


def built(name: str, task: str = "classification", n_outputs: int = 3, **model) -> Backend:
    backend = make_backend(name)
    backend.build(ModelSpec(**model), N_FEATURES, n_outputs if task == "classification" else 1, task)
    return backend


def stream(task: str, n_outputs: int = 3, n_batches: int = 50, seed: int = 0):
    """Mini-batches of varying size from a fixed random teacher."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(N_FEATURES, n_outputs))
    for _ in range(n_batches):
        x = rng.normal(size=(int(rng.integers(1, 33)), N_FEATURES)).astype(np.float32)
        scores = x @ teacher
        y = scores.argmax(1) if task == "classification" else scores[:, 0].astype(np.float32)
        yield x, y


PROBE = np.random.default_rng(99).normal(size=(64, N_FEATURES)).astype(np.float32)


# -- torch and tensorflow compute the same thing ---------------------------


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_same_seed_same_start_same_training(kind, task):
    model = dict(kind=kind, hidden=[16, 8], optimizer={"name": "sgd", "lr": 0.05}, seed=3)
    torch_b, tf_b = built("torch", task, **model), built("tensorflow", task, **model)
    np.testing.assert_allclose(torch_b.predict(PROBE), tf_b.predict(PROBE), atol=1e-5)
    for x, y in stream(task):
        assert torch_b.train_step(x, y) == pytest.approx(tf_b.train_step(x, y), rel=1e-4, abs=1e-5)
    np.testing.assert_allclose(torch_b.predict(PROBE), tf_b.predict(PROBE), atol=1e-4)
    assert torch_b.predict(PROBE).shape == (64, 3 if task == "classification" else 1)


@pytest.mark.parametrize(
    "optimizer",
    [{"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}, {"name": "adam", "lr": 0.01, "weight_decay": 0.01}],
    ids=["sgd-momentum-wd", "adam-wd"],
)
def test_optimizers_configured_alike(optimizer):
    # Adam differs only in where epsilon sits (keras: "epsilon hat"), hence the looser bound.
    torch_b, tf_b = built("torch", optimizer=optimizer), built("tensorflow", optimizer=optimizer)
    for x, y in stream("classification"):
        torch_b.train_step(x, y), tf_b.train_step(x, y)
    np.testing.assert_allclose(torch_b.predict(PROBE), tf_b.predict(PROBE), atol=1e-3)


def test_state_crosses_frameworks():
    spec = dict(optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9})
    torch_b, tf_b = built("torch", **spec), built("tensorflow", **spec)
    for x, y in stream("classification", n_batches=10, seed=1):
        torch_b.train_step(x, y)
    tf_b.set_state(torch_b.get_state())  # SGD momentum converted, kernels already [in, out]
    np.testing.assert_allclose(tf_b.predict(PROBE), torch_b.predict(PROBE), atol=1e-5)
    for x, y in stream("classification", n_batches=10, seed=2):
        torch_b.train_step(x, y), tf_b.train_step(x, y)
    np.testing.assert_allclose(tf_b.predict(PROBE), torch_b.predict(PROBE), atol=1e-4)


# -- per backend -----------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def name(request) -> str:
    return request.param


@pytest.mark.parametrize("optimizer", [{"name": "sgd", "momentum": 0.9}, {"name": "adam"}], ids=["sgd", "adam"])
def test_state_roundtrip_continues_identically(name, optimizer):
    original = built(name, optimizer=optimizer)
    for x, y in stream("classification", n_batches=5):
        original.train_step(x, y)
    state = original.get_state()
    assert {"model/0.kernel", "model/0.bias", "optim/step"} <= state.keys()
    assert state["model/0.kernel"].shape == (N_FEATURES, 32)  # [in, out] in both frameworks
    assert int(state["optim/step"]) == 5
    restored = built(name, optimizer=optimizer, seed=123)  # never trained, different initial weights
    restored.set_state(state)
    for x, y in stream("classification", n_batches=5, seed=7):
        assert original.train_step(x, y) == restored.train_step(x, y)
    np.testing.assert_array_equal(original.predict(PROBE), restored.predict(PROBE))
    # get_state is a snapshot, not a view of live weights
    assert not np.array_equal(state["model/0.kernel"], original.get_state()["model/0.kernel"])


def test_fresh_state_roundtrip(name):
    a, b = built(name, optimizer={"name": "adam"}), built(name, optimizer={"name": "adam"})
    b.set_state(a.get_state())
    x, y = next(stream("classification"))
    assert a.train_step(x, y) == b.train_step(x, y)
    np.testing.assert_array_equal(a.predict(PROBE), b.predict(PROBE))


def test_set_state_rejects_other_architecture(name):
    backend = built(name)
    before = backend.predict(PROBE)
    with pytest.raises(ValueError, match="missing"):
        backend.set_state(built(name, hidden=[8, 8]).get_state())
    state = built(name, n_outputs=4).get_state()
    with pytest.raises(ValueError, match="shape"):
        backend.set_state(state)
    np.testing.assert_array_equal(backend.predict(PROBE), before)  # nothing half-loaded


@pytest.mark.parametrize("kind", ["mlp", "user"])
def test_same_seed_same_predictions(name, kind):
    def run() -> np.ndarray:
        backend = built(name, kind=FACTORIES[name] if kind == "user" else kind, seed=5)
        for x, y in stream("classification", n_batches=10):
            backend.train_step(x, y)
        return backend.predict(PROBE)

    np.testing.assert_array_equal(run(), run())


def test_learns_a_separable_problem(name):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 2)).astype(np.float32)
    y = (x[:, 0] + 2 * x[:, 1] > 0).astype(np.int64)
    backend = make_backend(name)
    backend.build(ModelSpec(kind="mlp", hidden=[8], optimizer={"name": "adam", "lr": 0.02}), 2, 2, "classification")
    for _ in range(2):
        for i in range(0, 2000, 32):
            backend.train_step(x[i : i + 32], y[i : i + 32])
    probs = backend.predict(x)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert (probs.argmax(1) == y).mean() > 0.95


def test_bad_batches_are_clear_errors(name):
    backend = built(name)
    with pytest.raises(ValueError, match="x must be"):
        backend.predict(np.zeros((2, N_FEATURES + 1), np.float32))
    with pytest.raises(ValueError, match="class indices"):
        backend.train_step(np.zeros((2, N_FEATURES), np.float32), np.array([0, 3]))
    with pytest.raises(ValueError, match="does not fit task"):
        built(name, task="regression", loss="cross_entropy")
    with pytest.raises(ValueError, match="n_outputs == 1"):
        make_backend(name).build(ModelSpec(), N_FEATURES, 2, "regression")


# -- tensorflow: compiled once ---------------------------------------------


@pytest.mark.parametrize(
    "jit, sizes",
    [(False, [*range(1, 41), 3, 17, 40, 1]), (True, [1, 3, 5, 7, 2, 6])],  # XLA: one compile per padded size
    ids=["graph", "xla"],
)
def test_tensorflow_traces_once_for_any_batch_size(jit, sizes):
    backend = built("tensorflow", compile=jit)
    reference = built("tensorflow")
    assert backend.tracing_count == 2  # traced at build
    rng = np.random.default_rng(0)
    for n in sizes:
        x = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
        y = rng.integers(0, 3, n)
        # padded rows (XLA) must not change the loss, the gradients or the outputs
        assert backend.train_step(x, y) == pytest.approx(reference.train_step(x, y), rel=1e-5)
        assert backend.predict(x).shape == (n, 3)
    assert backend.tracing_count == 2  # still one train trace and one predict trace
    np.testing.assert_allclose(backend.predict(PROBE), reference.predict(PROBE), atol=1e-5)


# -- torch.compile ---------------------------------------------------------


@pytest.mark.slow  # inductor's first compile takes ~20 s on 2 cores (seconds once cached)
def test_torch_compile_matches_eager():
    compiled, eager = built("torch", compile=True, hidden=[8]), built("torch", hidden=[8])
    rng = np.random.default_rng(0)
    for _ in range(3):  # one batch size: a new size would cost a (dynamic-shape) recompile
        x, y = rng.normal(size=(16, N_FEATURES)).astype(np.float32), rng.integers(0, 3, 16)
        assert compiled.train_step(x, y) == pytest.approx(eager.train_step(x, y), rel=1e-5)
    np.testing.assert_allclose(compiled.predict(PROBE), eager.predict(PROBE), atol=1e-5)


# -- user factories --------------------------------------------------------


def test_user_factory(name):
    backend = built(name, kind=FACTORIES[name])
    for x, y in stream("classification", n_batches=5):
        assert np.isfinite(backend.train_step(x, y))
    probs = backend.predict(PROBE)
    assert probs.shape == (64, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    fresh = built(name, kind=FACTORIES[name], seed=1)
    fresh.set_state(backend.get_state())
    np.testing.assert_array_equal(fresh.predict(PROBE), probs)


@pytest.mark.parametrize(
    "kind, error, message",
    [
        ("tests.no_such_module:make", ImportError, "cannot import module 'tests.no_such_module'"),
        ("tests.fixtures_models:no_such_factory", ImportError, "has no attribute 'no_such_factory'"),
        ("tests.fixtures_models:NOT_CALLABLE", TypeError, "not callable"),
        ("tests.fixtures_models:make_not_a_model", TypeError, "must return a"),
    ],
)
def test_bad_factories_are_clear_errors(name, kind, error, message):
    with pytest.raises(error, match=message):
        built(name, kind=kind)


def test_factory_for_the_other_framework_is_a_type_error():
    with pytest.raises(TypeError, match="must return a keras.Model, got Sequential"):
        built("tensorflow", kind=FACTORIES["torch"])
    with pytest.raises(TypeError, match=r"must return a torch.nn.Module, got Sequential"):
        built("torch", kind=FACTORIES["tensorflow"])
    with pytest.raises(ValueError, match=r"output has shape \(16, 4\) for a batch of 16 rows of 5 features, "
                                         r"expected \(16, 3\)"):
        built("torch", kind="tests.fixtures_models:make_wrong_width")


# -- registry --------------------------------------------------------------


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="'torch' or 'tensorflow'"):
        make_backend("jax")


def _python(code: str) -> subprocess.CompletedProcess:
    src = str(ROOT / "src")
    return subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {src!r})\n{code}"], capture_output=True, text=True
    )


def test_imports_are_lazy():
    result = _python(
        "import tensorstream.backends\n"
        "assert 'torch' not in sys.modules and 'tensorflow' not in sys.modules\n"
        "tensorstream.backends.make_backend('torch')\n"
        "assert 'torch' in sys.modules and 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
    )
    assert result.returncode == 0, result.stderr
    result = _python(
        "import tensorstream.backends\n"
        "tensorstream.backends.make_backend('tensorflow')\n"
        "assert 'tensorflow' in sys.modules and 'torch' not in sys.modules\n"
    )
    assert result.returncode == 0, result.stderr


def test_missing_framework_names_the_extra():
    result = _python(
        "sys.modules['torch'] = None  # as if not installed\n"
        "from tensorstream.backends import make_backend\n"
        "try:\n    make_backend('torch')\nexcept ImportError as e:\n    print(e)\n"
    )
    assert "pip install 'tensorstream[torch]'" in result.stdout, result.stderr


def test_torch_flushes_denormals_only_while_it_works():
    """Flush-to-zero (Adam's decaying moments are ~100x slower as denormals) must not leak:
    the CPU flag also changes Python's own floats."""
    from tensorstream.backends.torch import flushing_denormals

    tiny = 5e-324
    with flushing_denormals():
        assert tiny * 1.0 == 0.0
    assert tiny * 1.0 == tiny
    backend = built("torch")
    backend.learn_sequential(PROBE, np.zeros(len(PROBE), dtype=np.int64))
    backend.train_step(PROBE, np.zeros(len(PROBE), dtype=np.int64))
    backend.predict(PROBE)
    assert tiny * 1.0 == tiny
