"""Per-layer calibration statistics, gathered by hooks and shared between linears that read the
same input (q/k/v, gate/up), so each statistic is accumulated once per distinct input."""

from __future__ import annotations

import weakref

import torch
from torch import nn


class LayerStats:
    """Accumulate ``col_sq`` (Σx² per input channel) and/or ``xtx`` (XᵀX) in fp32.

    Sharing is found on the first sample: linears whose pre-hook sees the very same input
    tensor object share one accumulator. The inputs seen during a sample are remembered by
    weak reference: a freed input can be mistaken for no later one (its reference is dead,
    whatever reuses its id or memory), and none is kept alive past its use in the forward.
    """

    def __init__(self, linears: dict[str, nn.Linear], needs: frozenset[str]):
        self.needs = needs
        self.owner: dict[str, str] = {}
        self.col_sq: dict[str, torch.Tensor] = {}
        self.xtx: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._seen: list[tuple[weakref.ref, str]] = []
        self._handles = [lin.register_forward_pre_hook(self._hook(name)) for name, lin in linears.items()]

    def _hook(self, name: str):
        def fn(_module, args):
            x = args[0]
            if name not in self.owner:
                self.owner[name] = next((n for t, n in self._seen if t() is x), name)
            self._seen.append((weakref.ref(x), name))
            if self.owner[name] == name:
                self._accumulate(name, x)
        return fn

    @torch.no_grad()
    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if name not in self.tokens:
            self.tokens[name] = 0
            cols = x.shape[1]
            if "xtx" in self.needs:
                self.xtx[name] = torch.zeros(cols, cols, device=x.device)
            elif "col_sq" in self.needs:
                self.col_sq[name] = torch.zeros(cols, device=x.device)
        self.tokens[name] += x.shape[0]
        if "xtx" in self.needs:
            self.xtx[name].addmm_(x.t(), x)
        elif "col_sq" in self.needs:
            self.col_sq[name] += (x * x).sum(0)

    def next_sample(self) -> None:
        self._seen.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._seen.clear()

    def groups(self) -> dict[str, list[str]]:
        """Leader name → all linears sharing its input (leader first), in module order."""
        out: dict[str, list[str]] = {}
        for name, owner in self.owner.items():
            out.setdefault(owner, []).append(name)
        return out

    def get(self, leader: str) -> dict[str, torch.Tensor]:
        """The statistics of one input; ``col_sq`` is diag(XᵀX) when XᵀX was collected."""
        s: dict[str, torch.Tensor] = {}
        if leader in self.xtx:
            s["xtx"] = self.xtx[leader]
            s["col_sq"] = torch.diagonal(self.xtx[leader])
        elif leader in self.col_sq:
            s["col_sq"] = self.col_sq[leader]
        return s

    def per_linear(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every hooked linear's statistics (those of the input it shares with its leader)."""
        return {name: self.get(owner) for name, owner in self.owner.items()}
