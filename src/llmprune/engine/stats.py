"""Per-layer calibration statistics, gathered by hooks and shared between linears that read the
same input (q/k/v, gate/up), so each statistic is accumulated once per distinct input.

Methods, refiners, solvers and allocators declare the statistics they read by name
(:data:`STATISTICS`); the engine accumulates the union of those names, in fp32.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

# name → what a method receives under it (accumulated over every calibration token that reached
# the linear; for an MoE expert, the tokens routed to it).
STATISTICS: dict[str, str] = {
    "col_sq": "Σx² per input column, (in,) — diag(XᵀX) when XᵀX is collected",
    "col_mean": "Σx / tokens per input column, (in,)",
    "xtx": "XᵀX, (in, in)",
    "tokens": "how many tokens the statistics summed, a 0-dim tensor (always given)",
}
# Accumulated as sums; col_sq comes from XᵀX's diagonal when both are needed.
_SUMS = ("col_sq", "col_mean", "xtx")
XTX = frozenset({"xtx"})  # what OSSCAR and the re-fits need
NO_STATS: frozenset[str] = frozenset()  # a forward only (outputs, hooks of the caller)


def check_needs(needs: frozenset[str]) -> None:
    """Refuse statistic names the engine does not know."""
    unknown = sorted(set(needs) - set(STATISTICS))
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; the engine collects {', '.join(STATISTICS)}")


class LayerStats:
    """Accumulate the statistics in ``needs`` (names of :data:`STATISTICS`) in fp32.

    Sharing is found on the first sample: linears whose pre-hook sees the very same input
    tensor object share one accumulator. The inputs seen during a sample are remembered by
    weak reference: a freed input can be mistaken for no later one (its reference is dead,
    whatever reuses its id or memory), and none is kept alive past its use in the forward.
    """

    def __init__(self, linears: dict[str, nn.Linear], needs: frozenset[str]):
        check_needs(needs)
        self.needs = needs
        # what is summed: col_sq is read off XᵀX's diagonal when XᵀX is there
        self._sums = [n for n in _SUMS if n in needs and not (n == "col_sq" and "xtx" in needs)]
        self.owner: dict[str, str] = {}
        self.sums: dict[str, dict[str, torch.Tensor]] = {n: {} for n in self._sums}
        self.tokens: dict[str, int] = {}
        self._seen: list[tuple[weakref.ref, str]] = []
        self._handles = [lin.register_forward_pre_hook(self._hook(name)) for name, lin in linears.items()]

    @property
    def xtx(self) -> dict[str, torch.Tensor]:
        """XᵀX by leader (empty when not collected)."""
        return self.sums.get("xtx", {})

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
            for n in self._sums:
                shape = (cols, cols) if n == "xtx" else (cols,)
                self.sums[n][name] = torch.zeros(shape, device=x.device)
        self.tokens[name] += x.shape[0]
        if "xtx" in self.sums:
            self.sums["xtx"][name].addmm_(x.t(), x)
        if "col_sq" in self.sums:
            self.sums["col_sq"][name] += (x * x).sum(0)
        if "col_mean" in self.sums:
            self.sums["col_mean"][name] += x.sum(0)

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
        """The statistics of one input (see :data:`STATISTICS`): ``col_sq`` is diag(XᵀX) when
        XᵀX was collected, ``col_mean`` the sum divided by ``tokens``."""
        s: dict[str, torch.Tensor] = {}
        if leader not in self.tokens:
            return s
        n = self.tokens[leader]
        if "xtx" in self.sums:
            s["xtx"] = self.sums["xtx"][leader]
            s["col_sq"] = torch.diagonal(s["xtx"])
        if "col_sq" in self.sums:
            s["col_sq"] = self.sums["col_sq"][leader]
        if "col_mean" in self.sums:
            s["col_mean"] = self.sums["col_mean"][leader] / n
        s["tokens"] = torch.tensor(float(n))
        return s

    def per_linear(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every hooked linear's statistics (those of the input it shares with its leader)."""
        return {name: self.get(owner) for name, owner in self.owner.items()}
