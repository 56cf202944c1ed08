"""Muon for a decoder's hidden weight matrices and AdamW for everything else, as one torch optimizer: checkpoints,
learning-rate schedules and gradient clipping treat it as they treat AdamW.

Muon replaces each matrix's momentum by its nearest semi-orthogonal matrix (five Newton-Schulz iterations) and
scales the step by 0.2 * sqrt(max(rows, cols)), so the learning rate and weight decay tuned for AdamW carry over
(`adjust_lr_fn="match_rms_adamw"` in torch.optim.Muon). Embeddings, the output head, norms and biases are not
hidden matrices and keep AdamW (torch's own functional update).

torch.optim.Muon runs the iteration in bf16, which a CPU without native bf16 (AVX2 alone) emulates 30 to 50 times
slower than fp32 (docs/findings/speed/orthogonalize.txt). Here it runs in bf16 only where the device has it
natively (the caller passes `ns_dtype`; pretrain asks lmforge.runtime.native_bf16), in fp32 elsewhere.
"""

from __future__ import annotations

import math

import torch
from torch.optim.adamw import adamw

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic of torch.optim.Muon and the nanoGPT speedrun


def orthogonalize(grad: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32, eps: float = 1e-7):
    """The Newton-Schulz approximation of U V^T for grad = U S V^T, computed in `dtype` (torch.optim.Muon's
    iteration, whose dtype is bf16)."""
    a, b, c = NS_COEFFICIENTS
    x = grad.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide side: the Gram matrix is the smaller one
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def hidden_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights of the linear layers inside the decoder: not the embeddings, not the output head (tied or not)."""
    outside = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        outside.add(id(head.weight))
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)
            and m.weight.requires_grad and id(m.weight) not in outside]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Muon for the hidden matrices; AdamW with decay for the other matrices, without it for norms and biases."""
    muon = hidden_matrices(model)
    taken = {id(p) for p in muon}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    return [{"params": muon, "muon": True, "weight_decay": weight_decay},
            {"params": [p for p in rest if p.dim() >= 2], "muon": False, "weight_decay": weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "muon": False, "weight_decay": 0.0}]


class MuonAdamW(torch.optim.Optimizer):
    """Groups with `muon: True` take Muon's update (2-D parameters only); the others take AdamW's."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5, eps: float = 1e-8,
                 ns_dtype: torch.dtype = torch.float32):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, eps=eps, muon=False)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon takes 2-D weight matrices only; give other parameters to an AdamW group")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon(group, params)
            elif params:
                self._adamw(group, params)
        return loss

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, mu = group["lr"], group["momentum"]
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:  # not setdefault: that would allocate a zero matrix every step
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)  # an average of the gradients, as torch.optim.Muon keeps it
            update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
            p.mul_(1 - lr * group["weight_decay"])  # decoupled, as AdamW's
            scale = 0.2 * math.sqrt(max(p.shape))  # the update's RMS matches AdamW's: AdamW's lr carries over
            p.add_(orthogonalize(update, group["ns_steps"], self.ns_dtype), alpha=-lr * scale)

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [], [s["step"] for s in states], amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
