"""PyTorch backend: eager by default, ``compile: true`` -> ``torch.compile``.

Arrays cross the boundary without copies (``torch.from_numpy`` in,
``Tensor.numpy()`` out). Built-in models load the shared numpy initial
weights, so they start exactly where the tensorflow backend starts. The
optimizer works on one flat buffer and refuses non-finite steps
(:mod:`tensorstream.backends.torch_steps`); ``learn_sequential`` runs exact
per-record test-then-train in one TorchScript call for the built-in models
and in a tight eager loop for user models.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tensorstream.backends import check
from tensorstream.backends import init as common
from tensorstream.backends.base import MAX_GRAD, SequentialResult
from tensorstream.backends.torch_steps import ADAM_EPSILON, FlatOptimizer, scripted_mlp_sequence
from tensorstream.spec import ModelSpec

# Zero-copy decoded payloads are read-only numpy buffers. We only ever read
# input tensors, so torch's generic "array is not writable" warning is noise.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}

_Named = list[tuple[str, torch.Tensor, bool]]  # (state name, tensor, stored transposed)

_SUBNORMAL = 5e-324  # the smallest double: 0 when the CPU flushes denormals


@contextmanager
def flushing_denormals() -> Iterator[None]:
    """Denormals flushed to zero for the duration (as TensorFlow does on its own threads).

    Adam's moments of weights whose gradient stays 0 (a dead ReLU unit) decay into
    the denormal range within a few thousand steps, where x86 arithmetic is ~100x
    slower (measured: the optimizer step went from 8 to 40 us per record on a
    7k-weight MLP after 20k records). The CPU flag is per thread and also changes
    Python's own floats, so it is set around the backend's work only and put back
    as it was.
    """
    already = _SUBNORMAL * 1.0 == 0.0
    if not already:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if not already:
            torch.set_flush_denormal(False)


def _builtin(model: ModelSpec, n_features: int, n_outputs: int) -> tuple[nn.Module, _Named]:
    weights = common.initial_weights(model, n_features, n_outputs)
    layers: list[nn.Module] = []
    named: _Named = []
    for i, (kernel, bias) in enumerate(weights):
        dense = nn.Linear(*kernel.shape)
        with torch.no_grad():
            dense.weight.copy_(torch.from_numpy(kernel.T))  # torch keeps [out, in]
            dense.bias.copy_(torch.from_numpy(bias))
        named += [(f"{i}.kernel", dense.weight, True), (f"{i}.bias", dense.bias, False)]
        layers.append(dense)
        if i < len(weights) - 1:
            layers.append(_ACTIVATIONS[model.activation]())
    return nn.Sequential(*layers), named


def _user_model(kind: str, n_features: int, n_outputs: int, task: str = "classification") -> nn.Module:
    """Call the user's factory and check the module on a batch (:mod:`tensorstream.backends.check`)."""
    module = check.call_factory(kind, n_features, n_outputs)
    if not isinstance(module, nn.Module):
        hint = " (a Keras model: use backend: tensorflow)" if type(module).__module__.startswith("keras") else ""
        raise check.FactoryTypeError(f"model.kind {kind!r} must return a torch.nn.Module, got "
                                     f"{type(module).__name__}{hint}")
    x = check.check_batch_for(n_features)
    try:
        with torch.inference_mode():
            out = module.eval()(torch.from_numpy(x))
    except Exception as err:
        raise check.forward_failed(kind, x, err) from err
    check.check_outputs(kind, out.numpy() if isinstance(out, torch.Tensor) else out, x, n_outputs, task,
                        _final_activation(module))
    return module


def _final_activation(module: nn.Module) -> str | None:
    """The softmax / log-softmax / sigmoid an ``nn.Sequential`` ends in (custom modules: found from their outputs)."""
    last = module
    while isinstance(last, nn.Sequential) and len(last):
        last = last[-1]
    if isinstance(last, (nn.Softmax, nn.LogSoftmax, nn.Sigmoid)):
        return f"nn.{type(last).__name__}()"
    return None


def _to_numpy(t: torch.Tensor, transposed: bool) -> np.ndarray:
    a = t.detach().numpy()
    return (a.T if transposed else a).copy()  # a snapshot, never a view of live weights


def _from_numpy(state: dict[str, np.ndarray], key: str, like: torch.Tensor, transposed: bool) -> torch.Tensor:
    a = np.asarray(state[key])
    a = a.T if transposed else a
    if a.shape != tuple(like.shape):
        raise ValueError(f"state {key!r} has shape {a.shape}, the model expects {tuple(like.shape)}")
    return torch.tensor(a, dtype=like.dtype)  # a copy, written into the live tensor by the caller


class TorchBackend:
    """The :class:`~tensorstream.backends.base.Backend` for PyTorch (CPU)."""

    name = "torch"
    #: ``learn_sequential`` is exact per-record learning here; the DDP subclass turns it off
    sequential = True

    def build(self, model: ModelSpec, n_features: int, n_outputs: int, task: str) -> None:
        self._loss = common.resolve_loss(model, task, n_outputs)
        self._task, self._n_features, self._n_outputs = task, n_features, n_outputs
        self._opt_spec = model.optimizer
        self._activation = model.activation
        if model.threads is not None:
            torch.set_num_threads(model.threads)  # process-wide: torch has no per-model setting
        torch.manual_seed(model.seed)  # dropout & co. in user models; built-ins are fully numpy-initialised
        if common.is_builtin(model):
            self._module, self._params = _builtin(model, n_features, n_outputs)
            self._builtin = True
        else:
            self._module = _user_model(model.kind, n_features, n_outputs, task)
            self._params = [(n, p, False) for n, p in self._module.named_parameters() if p.requires_grad]
            self._builtin = False
        self._submodules = list(self._module.modules())
        self._forward = torch.compile(self._module) if model.compile else self._module
        self._training: bool | None = None
        # Weight decay is decoupled (p -= lr*wd*p before the step), as keras does for SGD and Adam alike.
        self._opt = FlatOptimizer([p for _, p, _ in self._params], model.optimizer)
        # The compiled loop's view of the layers: weights and biases, and their gradients (views of
        # the flat buffers, so they stay valid as long as the optimizer does)
        lin = [t for _, t, _ in self._params]
        self._layers = (lin, [self._opt.grad[o:o + k].view_as(t) for (o, k), t in zip(self._opt.spans, lin, strict=True)])

    @staticmethod
    def check_user_model(model: ModelSpec, n_features: int, n_outputs: int, task: str) -> None:
        """Build ``model.kind``'s module once and check it (before any record: ``check.check_model``)."""
        _user_model(model.kind, n_features, n_outputs, task)

    def framework_model(self) -> nn.Module:
        """The live ``nn.Module`` (logits; no softmax), for export: copy it before changing its mode."""
        return self._module

    def _set_training(self, mode: bool) -> None:
        if self._builtin:  # Linear + activations act alike in both modes: skip the walk (~7% of a batch-1 step)
            return
        if self._training != mode:  # only on a change, and without Module.train()'s recursion
            for module in self._submodules:
                module.training = mode
            self._training = mode

    def predict(self, x: np.ndarray) -> np.ndarray:
        x, _ = common.check_batch(x, None, self._n_features, self._n_outputs, self._task)
        self._set_training(False)
        with torch.inference_mode(), flushing_denormals():
            out = self._forward(torch.from_numpy(x))
            if self._loss == "cross_entropy":
                out = torch.softmax(out, dim=1)
            return out.numpy()

    def _loss_of(self, out: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss, or the ``w``-weighted mean over rows."""
        if w is None:
            return F.cross_entropy(out, target) if self._loss == "cross_entropy" else F.mse_loss(out[:, 0], target)
        per_row = (F.cross_entropy(out, target, reduction="none") if self._loss == "cross_entropy"
                   else (out[:, 0] - target) ** 2)
        return (per_row * w).sum() / w.sum()

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        return self.train_guarded(x, y)[0]

    def train_guarded(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray | None]:
        """One step on the batch; rows with a non-finite loss or gradient are left out (and returned)."""
        with flushing_denormals():
            return self._train_guarded(x, y)

    def _train_guarded(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray | None]:
        x, y = common.check_batch(x, y, self._n_features, self._n_outputs, self._task)
        self._set_training(True)
        xt, target = torch.from_numpy(x), torch.from_numpy(y)
        loss = self._loss_of(self._forward(xt), target)
        self._opt.zero_grad()
        loss.backward()
        if self._opt.step(loss):
            return float(loss.detach()), None
        # Rare: find the rows that make the step non-finite, then step on the others only.
        refused = np.array([not self._row_ok(xt[i:i + 1], target[i:i + 1]) for i in range(len(x))])
        if refused.all():
            return math.nan, refused
        keep = torch.from_numpy(np.flatnonzero(~refused))  # dropped, not weighted 0: 0 * NaN is NaN
        loss = self._loss_of(self._forward(xt[keep]), target[keep])
        self._opt.zero_grad()
        loss.backward()
        if not self._opt.step(loss):  # finite rows one by one, but not together: learn none of them
            return math.nan, np.ones(len(x), dtype=bool)
        return float(loss.detach()), refused

    def _row_ok(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        loss = self._loss_of(self._forward(x), y)
        self._opt.zero_grad()
        loss.backward()
        return self._opt.finite(loss)

    def learn_sequential(self, x: np.ndarray, y: np.ndarray, learn: np.ndarray | None = None,
                         replay: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> SequentialResult:
        """Exact per-record test-then-train (see :class:`~tensorstream.backends.base.SequentialLearning`)."""
        x, y = common.check_batch(x, y, self._n_features, self._n_outputs, self._task)
        xs, ys, ws, flags = common.sequential_steps(x, y, learn, replay, self._task)
        with flushing_denormals():
            return self._sequence(torch.from_numpy(xs), torch.from_numpy(ys), torch.from_numpy(ws), flags)

    def _sequence(self, xs_t: torch.Tensor, ys_t: torch.Tensor, ws_t: torch.Tensor,
                  flags: np.ndarray) -> SequentialResult:
        if self._builtin:
            opt = self._opt
            lin, grads = self._layers
            targets = (-F.one_hot(ys_t, self._n_outputs).float() if self._loss == "cross_entropy"
                       else ys_t.unsqueeze(2))
            # Unoptimised execution: the profiling executor's optimisation pass costs ~15 ms on the
            # second call (a tenth of a short stream) and gains nothing measurable on this loop
            with torch.jit.optimized_execution(False):
                out, loss, refused = scripted_mlp_sequence()(
                    xs_t, targets, ws_t, torch.from_numpy(flags), lin[0::2], lin[1::2], grads[0::2], grads[1::2],
                    opt.flat, opt.grad, opt.slots, opt.step_count, opt.adam, opt.lr, opt.momentum, opt.weight_decay,
                    ADAM_EPSILON, self._loss == "cross_entropy", self._activation == "tanh", MAX_GRAD)
            return SequentialResult(out.numpy(), loss.numpy(), refused.numpy())
        return self._user_sequence(xs_t, ys_t, ws_t, flags)

    def _user_sequence(self, xs: torch.Tensor, ys: torch.Tensor, ws: torch.Tensor,
                       flags: np.ndarray) -> SequentialResult:
        """The per-record loop for user modules: eval-mode prediction, train-mode step, row by row."""
        n = len(xs)
        out = np.empty((n, self._n_outputs), np.float32)
        loss = np.full(n, np.nan, np.float32)
        refused = np.zeros(n, dtype=bool)
        for i in range(n):
            self._set_training(False)
            with torch.inference_mode():
                o = self._forward(xs[i, :1])
                out[i] = (torch.softmax(o, dim=1) if self._loss == "cross_entropy" else o)[0].numpy()
            if not flags[i]:
                continue
            self._set_training(True)
            w = ws[i] if xs.shape[1] > 1 else None
            step_loss = self._loss_of(self._forward(xs[i]), ys[i], w)
            self._opt.zero_grad()
            step_loss.backward()
            if self._opt.step(step_loss):
                loss[i] = float(step_loss.detach())
            else:
                refused[i] = True
        return SequentialResult(out, loss, refused)

    def set_learning_rate(self, lr: float) -> None:
        """Change the learning rate from the next step on (drift policies); not part of the state."""
        self._opt.lr = float(lr)

    # -- state -------------------------------------------------------------

    def _weights(self) -> _Named:
        if self._builtin:
            return self._params
        # User modules may carry buffers (BatchNorm statistics) besides parameters.
        return [(n, t, False) for n, t in self._module.state_dict(keep_vars=True).items()]

    def _state_keys(self) -> set[str]:
        keys = {f"model/{n}" for n, _, _ in self._weights()} | {"optim/step"}
        return keys | {f"optim/{n}.{slot}" for n, _, _ in self._params for slot in self._opt.slot_names}

    def get_state(self) -> dict[str, np.ndarray]:
        state = {f"model/{n}": _to_numpy(t, tr) for n, t, tr in self._weights()}
        state["optim/step"] = np.array(self._opt.steps, dtype=np.int64)
        for i, (n, _, tr) in enumerate(self._params):
            for s, slot in enumerate(self._opt.slot_names):
                state[f"optim/{n}.{slot}"] = _to_numpy(self._opt.slot_view(s, i), tr)
        return state

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        state = common.convert_momentum(state, "momentum", self._opt_spec.lr)
        common.check_state_keys(state, self._state_keys())
        # Convert (and shape-check) everything before changing anything.
        weights = [(t, _from_numpy(state, f"model/{n}", t, tr)) for n, t, tr in self._weights()]
        steps = int(state["optim/step"])
        slots = [(self._opt.slot_view(s, i), _from_numpy(state, f"optim/{n}.{slot}", p, tr))
                 for i, (n, p, tr) in enumerate(self._params) for s, slot in enumerate(self._opt.slot_names)]
        with torch.no_grad():
            for t, value in weights + slots:
                t.copy_(value)
            self._opt.step_count.fill_(float(steps))
