"""PyTorch backend: eager by default, ``compile: true`` -> ``torch.compile``.

Arrays cross the boundary without copies (``torch.from_numpy`` in,
``Tensor.numpy()`` out). Built-in models load the shared numpy initial
weights, so they start exactly where the tensorflow backend starts.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tensorstream.backends import init as common
from tensorstream.spec import ModelSpec

# Zero-copy decoded payloads are read-only numpy buffers. We only ever read
# input tensors, so torch's generic "array is not writable" warning is noise.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)

#: Keras' Adam default; torch's is 1e-8. Both backends use this one.
ADAM_EPSILON = 1e-7

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}

# (state slot name, torch optimizer state key) per optimizer
_ADAM_SLOTS = (("m", "exp_avg"), ("v", "exp_avg_sq"))
_SGD_SLOTS = (("momentum", "momentum_buffer"),)

_Named = list[tuple[str, torch.Tensor, bool]]  # (state name, tensor, stored transposed)


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


def _user_model(kind: str, n_features: int, n_outputs: int) -> nn.Module:
    module = common.load_factory(kind)(n_features=n_features, n_outputs=n_outputs)
    if not isinstance(module, nn.Module):
        raise TypeError(f"model kind {kind!r} must return a torch.nn.Module, got {type(module).__name__}")
    with torch.inference_mode():
        out = module.eval()(torch.zeros(2, n_features))
    if tuple(out.shape) != (2, n_outputs):
        raise ValueError(f"model kind {kind!r}: output shape {tuple(out.shape)} for 2 rows, expected (2, {n_outputs})")
    return module


def _to_numpy(t: torch.Tensor, transposed: bool) -> np.ndarray:
    a = t.detach().numpy()
    return (a.T if transposed else a).copy()  # a snapshot, never a view of live weights


def _from_numpy(state: dict[str, np.ndarray], key: str, like: torch.Tensor, transposed: bool) -> torch.Tensor:
    a = np.asarray(state[key])
    a = a.T if transposed else a
    if a.shape != tuple(like.shape):
        raise ValueError(f"state {key!r} has shape {a.shape}, the model expects {tuple(like.shape)}")
    return torch.tensor(a, dtype=like.dtype)  # a copy: optimizer slots are updated in place


class TorchBackend:
    """The :class:`~tensorstream.backends.base.Backend` for PyTorch (CPU)."""

    name = "torch"

    def build(self, model: ModelSpec, n_features: int, n_outputs: int, task: str) -> None:
        self._loss = common.resolve_loss(model, task, n_outputs)
        self._task, self._n_features, self._n_outputs = task, n_features, n_outputs
        self._opt_spec = opt = model.optimizer
        if model.threads is not None:
            torch.set_num_threads(model.threads)  # process-wide: torch has no per-model setting
        torch.manual_seed(model.seed)  # dropout & co. in user models; built-ins are fully numpy-initialised
        if common.is_builtin(model):
            self._module, self._params = _builtin(model, n_features, n_outputs)
            self._builtin = True
        else:
            self._module = _user_model(model.kind, n_features, n_outputs)
            self._params = [(n, p, False) for n, p in self._module.named_parameters()]
            self._builtin = False
        self._forward = torch.compile(self._module) if model.compile else self._module
        self._training: bool | None = None
        params = [p for _, p, _ in self._params]
        # Weight decay is applied by hand, decoupled (p -= lr*wd*p before the step),
        # because that is what keras does for SGD and Adam alike.
        if opt.name == "sgd":
            self._opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum)
            self._slots = _SGD_SLOTS if opt.momentum else ()
        else:
            self._opt = torch.optim.Adam(params, lr=opt.lr, eps=ADAM_EPSILON)
            self._slots = _ADAM_SLOTS
        self._steps = 0

    def framework_model(self) -> nn.Module:
        """The live ``nn.Module`` (logits; no softmax), for export: copy it before changing its mode."""
        return self._module

    def _set_training(self, mode: bool) -> None:
        if self._builtin:  # Linear + activations act alike in both modes: skip the walk (~7% of a batch-1 step)
            return
        if self._training != mode:  # .train() walks every submodule: only on a change
            self._module.train(mode)
            self._training = mode

    def predict(self, x: np.ndarray) -> np.ndarray:
        x, _ = common.check_batch(x, None, self._n_features, self._n_outputs, self._task)
        self._set_training(False)
        with torch.inference_mode():
            out = self._forward(torch.from_numpy(x))
            if self._loss == "cross_entropy":
                out = torch.softmax(out, dim=1)
            return out.numpy()

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        x, y = common.check_batch(x, y, self._n_features, self._n_outputs, self._task)
        self._set_training(True)
        out = self._forward(torch.from_numpy(x))
        target = torch.from_numpy(y)
        loss = F.cross_entropy(out, target) if self._loss == "cross_entropy" else F.mse_loss(out[:, 0], target)
        self._opt.zero_grad(set_to_none=True)
        loss.backward()
        if wd := self._opt_spec.weight_decay:
            with torch.no_grad():
                for _, p, _ in self._params:
                    p.sub_(p * wd * self._opt.param_groups[0]["lr"])  # the current lr, as keras does
        self._opt.step()
        self._steps += 1
        return float(loss.detach())

    def set_learning_rate(self, lr: float) -> None:
        """Change the learning rate from the next step on (drift policies); not part of the state."""
        for group in self._opt.param_groups:
            group["lr"] = float(lr)

    # -- state -------------------------------------------------------------

    def _weights(self) -> _Named:
        if self._builtin:
            return self._params
        # User modules may carry buffers (BatchNorm statistics) besides parameters.
        return [(n, t, False) for n, t in self._module.state_dict(keep_vars=True).items()]

    def _state_keys(self) -> set[str]:
        keys = {f"model/{n}" for n, _, _ in self._weights()} | {"optim/step"}
        return keys | {f"optim/{n}.{slot}" for n, _, _ in self._params for slot, _ in self._slots}

    def get_state(self) -> dict[str, np.ndarray]:
        state = {f"model/{n}": _to_numpy(t, tr) for n, t, tr in self._weights()}
        state["optim/step"] = np.array(self._steps, dtype=np.int64)
        for n, p, tr in self._params:
            slots = self._opt.state.get(p, {})
            for slot, key in self._slots:
                buf = slots.get(key)
                state[f"optim/{n}.{slot}"] = _to_numpy(torch.zeros_like(p) if buf is None else buf, tr)
        return state

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        state = common.convert_momentum(state, "momentum", self._opt_spec.lr)
        common.check_state_keys(state, self._state_keys())
        # Convert (and shape-check) everything before changing anything.
        weights = [(t, _from_numpy(state, f"model/{n}", t, tr)) for n, t, tr in self._weights()]
        steps = int(state["optim/step"])
        slots = {p: {key: _from_numpy(state, f"optim/{n}.{s}", p, tr) for s, key in self._slots} for n, p, tr in self._params}
        with torch.no_grad():
            for t, value in weights:
                t.copy_(value)
        self._steps = steps
        for p, slot in slots.items():
            if self._slots is _ADAM_SLOTS:
                slot["step"] = torch.tensor(float(steps), dtype=torch.float32)
            self._opt.state[p] = slot
