"""The torch backend's optimizer and its per-record training loop.

:class:`FlatOptimizer` keeps every trainable parameter in one flat float32
buffer (the parameters become views of it; their ``.grad`` are views of a flat
gradient buffer), so an optimizer step is a handful of kernels whatever the
number of layers: one ``torch._fused_adam_`` call for Adam (the kernel behind
``torch.optim.Adam(fused=True)``, bit-identical to the default implementation
on CPU), two ops for SGD with momentum. Every step is guarded: a step whose
loss is non-finite, or whose gradient has an entry beyond
:data:`~tensorstream.backends.base.MAX_GRAD` (or a NaN), is refused and
changes nothing.

:func:`mlp_sequence` is exact test-then-train for the built-in models, row by
row, in one TorchScript call: forward, the gradient written by hand (dense
layers, relu/tanh, softmax cross-entropy or squared error), the guard and the
optimizer step, with no Python between two rows. TorchScript is deprecated in
favour of ``torch.compile``, but ``torch.compile`` cannot run a loop whose
length is data without unrolling it (and compiles for seconds to minutes on a
small machine), while this loop scripts in well under a second; should
scripting ever fail, the same function runs as plain Python (slower, same
numbers).
"""

# No ``from __future__ import annotations``: TorchScript reads these annotations as objects.
import logging
import warnings
from typing import Any

import torch
from torch import Tensor

from tensorstream.backends.base import MAX_GRAD
from tensorstream.spec import OptimizerSpec

log = logging.getLogger(__name__)

#: Keras' Adam default; torch's is 1e-8. Both backends use this one.
ADAM_EPSILON = 1e-7
ADAM_BETAS = (0.9, 0.999)


class FlatOptimizer:
    """Adam or SGD (with momentum, decoupled weight decay) over one flat parameter buffer.

    Keeps the small part of ``torch.optim.Optimizer``'s interface the backends
    use (``zero_grad``, ``step``) so the DDP backend drives it the same way.
    """

    def __init__(self, params: list[Tensor], spec: OptimizerSpec) -> None:
        if any(p.dtype != torch.float32 for p in params):
            raise TypeError("trainable parameters must be float32 (the inputs are)")
        self.params = params
        self.spans: list[tuple[int, int]] = []
        total = sum(p.numel() for p in params)
        self.flat = torch.zeros(total)
        self.grad = torch.zeros(total)
        self._grad_views: list[Tensor] = []
        offset = 0
        with torch.no_grad():
            for p in params:
                k = p.numel()
                view = self.flat[offset:offset + k].view_as(p)
                view.copy_(p)
                p.data = view  # the parameter now lives in the flat buffer
                self._grad_views.append(self.grad[offset:offset + k].view_as(p))
                self.spans.append((offset, k))
                offset += k
        self.adam = spec.name == "adam"
        self.lr = float(spec.lr)
        self.momentum = float(spec.momentum)
        self.weight_decay = float(spec.weight_decay)
        n_slots = 2 if self.adam else (1 if self.momentum else 0)
        self.slot_names: tuple[str, ...] = ("m", "v") if self.adam else (("momentum",) if self.momentum else ())
        self.slots = [torch.zeros(total) for _ in range(n_slots)]
        self.step_count = torch.zeros((), dtype=torch.float32)  # Adam's bias correction reads it (a tensor)
        self.attach()

    def attach(self) -> None:
        """(Re)make every ``param.grad`` a view of the flat gradient buffer."""
        for p, g in zip(self.params, self._grad_views, strict=True):
            p.grad = g

    def zero_grad(self, set_to_none: bool = False) -> None:
        # The views stay attached whatever ``set_to_none`` says: backward then
        # accumulates straight into the flat buffer.
        self.grad.zero_()
        self.attach()

    def _gather(self) -> None:
        # Someone (DDP, a user hook) may have replaced a .grad: copy it into the flat buffer.
        for p, g in zip(self.params, self._grad_views, strict=True):
            if p.grad is None:
                g.zero_()
            elif p.grad is not g:
                g.copy_(p.grad)
                p.grad = g

    def finite(self, loss: Tensor | None = None) -> bool:
        """Whether the gradient (and ``loss``) allow a step: all finite, |g| < MAX_GRAD."""
        ok = bool(self.grad.abs().max() < MAX_GRAD) if self.grad.numel() else True
        return ok and (loss is None or bool(torch.isfinite(loss)))

    @torch.no_grad()
    def step(self, loss: Tensor | None = None) -> bool:
        """Apply the gradient in the flat buffer unless the guard refuses it; True if applied."""
        self._gather()
        if not self.finite(loss):
            return False
        if self.weight_decay:  # decoupled, as keras does: p -= lr * wd * p before the update
            self.flat.mul_(1.0 - self.lr * self.weight_decay)
        if self.adam:
            self.step_count.add_(1)
            torch._fused_adam_([self.flat], [self.grad], [self.slots[0]], [self.slots[1]], [], [self.step_count],
                               lr=self.lr, beta1=ADAM_BETAS[0], beta2=ADAM_BETAS[1], weight_decay=0.0,
                               eps=ADAM_EPSILON, amsgrad=False, maximize=False)
        elif self.slots:
            self.slots[0].mul_(self.momentum).add_(self.grad)
            self.flat.add_(self.slots[0], alpha=-self.lr)
        else:
            self.flat.add_(self.grad, alpha=-self.lr)
        if not self.adam:
            self.step_count.add_(1)
        return True

    @property
    def steps(self) -> int:
        return int(self.step_count.item())

    def slot_view(self, slot: int, i: int) -> Tensor:
        """Slot ``slot`` of parameter ``i``, shaped like the parameter (a view)."""
        offset, k = self.spans[i]
        return self.slots[slot][offset:offset + k].view_as(self.params[i])


@torch.jit.ignore
def _adam(flat: Tensor, grad: Tensor, m: Tensor, v: Tensor, step: Tensor, lr: float, eps: float) -> None:
    # Called back from the scripted loop: TorchScript drops _fused_adam_ (it returns nothing, and
    # the writes to its list arguments are not seen as side effects), and Adam written op by op
    # there costs 4x the fused kernel on a few thousand weights.
    torch._fused_adam_([flat], [grad], [m], [v], [], [step], lr=lr, beta1=ADAM_BETAS[0], beta2=ADAM_BETAS[1],
                       weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)


def mlp_sequence(
    xs: Tensor, targets: Tensor, ws: Tensor, learn: Tensor, weights: list[Tensor],
    biases: list[Tensor], gweights: list[Tensor], gbiases: list[Tensor], flat: Tensor, grad: Tensor,
    slots: list[Tensor], step: Tensor, adam: bool, lr: float, momentum: float, weight_decay: float,
    eps: float, classification: bool, tanh: bool, max_grad: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Test-then-train a built-in MLP row by row (see the module docstring).

    ``xs`` [n, m, d]: step i learns the m rows ``xs[i]`` (row 0 is record i,
    the rest its replay rows) weighted ``ws[i]``; record i is predicted first,
    from the weights left by step i-1. ``targets`` [n, m, outputs]: minus the
    one-hot classes (classification) or the targets (regression, [n, m, 1]).
    ``weights[l]`` are torch's [out, in] views of ``flat``;
    ``gweights``/``gbiases`` the matching views of ``grad``. Returns
    (predictions [n, out], loss [n] (NaN: not learned), refused [n]).

    The guard reads the gradient only: with these losses a non-finite loss
    always comes with a non-finite (or > ``max_grad``) gradient.
    """
    n = xs.size(0)
    m = xs.size(1)
    n_layers = len(weights)
    rows: list[Tensor] = []
    step_outs: list[Tensor] = []  # m > 1: each learned step's log-softmax (logits), for its loss
    refused = torch.zeros([n], dtype=torch.bool)
    flags: list[bool] = learn.tolist()
    # The step's loss is the weighted mean over its rows: d(loss)/d(log-softmax) is -onehot * w
    # (squared error: d/d(out) is 2 * (out - y) * w); the weights for all steps at once.
    w = (ws / ws.sum(1, keepdim=True)).unsqueeze(2)
    gos = targets * w if classification else 2.0 * w
    with torch.no_grad():
        for i in range(n):
            h = xs[i]
            hs: list[Tensor] = [h]
            for j in range(n_layers - 1):
                z = torch.nn.functional.linear(h, weights[j], biases[j])
                h = torch.tanh(z) if tanh else torch.relu(z)
                hs.append(h)
            logits = torch.nn.functional.linear(h, weights[n_layers - 1], biases[n_layers - 1])
            rows.append(logits)  # softmax-ed all at once at the end: what predict() returns, bit for bit
            if not flags[i]:
                continue
            # The gradient is computed as autograd computes it, kernel for kernel: Adam turns
            # last-bit differences in tiny gradients into full-size steps, and they add up.
            if classification:
                lp = torch.log_softmax(logits, 1)
                g = torch.ops.aten._log_softmax_backward_data(gos[i], lp, 1, torch.float32)
            else:
                lp = logits
                g = (logits - targets[i]) * 2.0 if m == 1 else (logits - targets[i]) * gos[i]
            if m > 1:
                step_outs.append(lp)
            for j in range(n_layers - 1, -1, -1):
                torch.mm(g.t(), hs[j], out=gweights[j])
                torch.sum(g, [0], False, out=gbiases[j])
                if j > 0:
                    g = torch.mm(g, weights[j])
                    if tanh:
                        g = torch.ops.aten.tanh_backward(g, hs[j])
                    else:
                        g = torch.ops.aten.threshold_backward(g, hs[j], 0.0)
            lo, hi = torch.aminmax(grad)  # one pass; NaN compares false
            if not (float(hi) < max_grad and float(lo) > -max_grad):
                refused[i] = True
                continue
            if weight_decay != 0.0:
                flat.mul_(1.0 - lr * weight_decay)
            step.add_(1)
            if adam:
                _adam(flat, grad, slots[0], slots[1], step, lr, eps)
            elif len(slots) > 0:
                slots[0].mul_(momentum).add_(grad)
                flat.add_(slots[0], alpha=-lr)
            else:
                flat.add_(grad, alpha=-lr)
        out = torch.cat(rows)[::m] if m > 1 else torch.cat(rows)
        if classification:
            out = torch.softmax(out, 1)
        learned = learn & ~refused
        if m > 1:
            losses = torch.full([n], float("nan"))
            if len(step_outs) > 0:
                lps = torch.stack(step_outs)
                losses[learn] = ((lps * gos[learn]).sum([1, 2]) if classification
                                 else ((lps - targets[learn]) ** 2 * w[learn]).sum([1, 2]))
        elif classification:  # one row per step: its loss is the prediction's (same weights, same forward)
            losses = -torch.log(torch.clamp(-(out * targets[:, 0]).sum(1), min=1e-30))
        else:
            losses = (out[:, 0] - targets[:, 0, 0]) ** 2
        losses = torch.where(learned, losses, torch.full([n], float("nan")))
    return out, losses, refused


_SCRIPTED: dict[str, Any] = {}


def scripted_mlp_sequence() -> Any:
    """:func:`mlp_sequence` under TorchScript (scripted once per process), or as Python if that fails."""
    if "fn" not in _SCRIPTED:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.script is deprecated": see the module doc
                _SCRIPTED["fn"] = torch.jit.script(mlp_sequence)
        except Exception as err:  # noqa: BLE001 - any scripting failure: the same code, unscripted
            log.warning("TorchScript unavailable (%s): the per-record loop runs as Python", err)
            _SCRIPTED["fn"] = mlp_sequence
    return _SCRIPTED["fn"]
