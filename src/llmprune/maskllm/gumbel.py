"""The differentiable N:M mask of one linear: a ``torch.nn.utils.parametrize`` on its weight.

Each group of M consecutive inputs of a row has ``C(M, N)`` logits (fp32, or bf16 to halve their
memory; the softmax is computed in fp32 either way). Training forward:
``p = softmax((κ·logits + g) / τ)`` with Gumbel noise g, soft mask = ``p @ candidates``, and
the layer computes with ``W ⊙ mask``. Evaluation: the argmax candidate (exactly N:M).

The Gumbel noise comes from a :class:`NoiseSource` that the trainer reseeds for every
micro-batch from (seed, step, global micro-batch index), so a run is reproducible across
resumes and process counts: micro-batch j draws the same noise whichever process runs it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from llmprune.errors import LLMPruneError
from llmprune.maskllm.candidates import candidates
from llmprune.models.adapter import masked_linears


class NoiseSource:
    """One seeded generator per device, shared by every mask of a model."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._gens: dict[torch.device, torch.Generator] = {}

    def reseed(self, seed: int) -> None:
        self.seed = seed
        for g in self._gens.values():
            g.manual_seed(seed)

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._gens:
            self._gens[device] = torch.Generator(device=device)
            self._gens[device].manual_seed(self.seed)
        return self._gens[device]


def _wide(W: torch.Tensor) -> torch.Tensor:
    # at least fp32: bf16 / fp16 tensors are widened, fp32 / fp64 stay as they are
    return W.to(torch.promote_types(W.dtype, torch.float32))


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """``g = −log(−log U)``, ``U ~ Uniform(0, 1)``: standard Gumbel noise (fp32).

    Drawn from uniforms because ``Tensor.exponential_`` is about 4x slower on CPUs.
    """
    u = torch.rand(shape, generator=generator, device=device).clamp_(min=torch.finfo(torch.float32).tiny)
    return u.log_().neg_().log_().neg_()


class _GumbelSoftMask(torch.autograd.Function):
    """``softmax((κ·logits + g) / τ) @ candidates`` in one function that saves only ``p``.

    Written out because PyTorch's softmax over a last dimension of a few elements is slow on
    CPUs (about 25x slower than the same reduction over the first dimension), and autograd of
    the plain expression would keep several ``(G, C)`` intermediates alive.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, noise: torch.Tensor, cands: torch.Tensor,
                kappa: float, tau: float) -> torch.Tensor:
        z = _wide(logits) * kappa  # a new tensor: the in-place steps below never touch the logits
        z.add_(noise).div_(tau)
        z.sub_(z.amax(dim=-1, keepdim=True)).exp_()
        p = z.div_(z.sum(dim=-1, keepdim=True))  # (G, C)
        ctx.save_for_backward(p, cands)
        ctx.scale, ctx.dtype = kappa / tau, logits.dtype
        return p @ cands  # (G, C) @ (C, M): never a (G, C, M) tensor

    @staticmethod
    def backward(ctx, grad_mask: torch.Tensor):
        p, cands = ctx.saved_tensors
        g = grad_mask.to(p.dtype) @ cands.T.to(p.dtype)  # ∂L/∂p, (G, C)
        g.sub_((g * p).sum(dim=-1, keepdim=True)).mul_(p).mul_(ctx.scale)  # softmax Jacobian · κ/τ
        return g.to(ctx.dtype), None, None, None, None


def gumbel_soft_mask(logits: torch.Tensor, cands: torch.Tensor, kappa: float, tau: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``(G, M)`` soft mask: a Gumbel-softmax sample (``hard=False``) of ``κ·logits`` at
    temperature ``τ``, times the ``(C, M)`` candidates."""
    noise = gumbel_noise(tuple(logits.shape), generator, logits.device)
    return _GumbelSoftMask.apply(logits, noise, cands, kappa, tau)


class _MaskedSqNorm(torch.autograd.Function):
    """``Σ (W ⊙ mask)²`` with W a constant, saving only references to W and the mask.

    The plain expression would keep two fp32 weight-sized tensors per layer alive until the
    backward pass (``W·mask`` and its square); this keeps none beyond the mask itself.
    """

    @staticmethod
    def forward(ctx, W: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(W, mask)
        return (_wide(W).square() * mask.square()).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        W, mask = ctx.saved_tensors
        return None, 2 * grad * _wide(W).square() * mask


def masked_sq_norm(W: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``‖W ⊙ mask‖²`` (fp32), differentiable in ``mask`` only (W is treated as detached)."""
    return _MaskedSqNorm.apply(W.detach(), mask)


class LearnableNMMask(nn.Module):
    """Parametrization ``W ↦ W ⊙ mask`` with learnable N:M logits ``(numel/M, C(M, N))``.

    ``tau`` and ``kappa`` are set by the trainer each step. In training mode the last forward's
    ``‖W ⊙ mask‖²`` (W detached, graph to the logits kept) is left in ``sq_norm`` for the
    sparse-weight regulariser.
    """

    def __init__(self, shape: torch.Size, n: int, m: int, init_std: float = 0.01,
                 generator: torch.Generator | None = None, noise: NoiseSource | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        out_f, in_f = shape
        if in_f % m:
            raise LLMPruneError(f"{in_f} input features are not divisible by M={m}")
        self.n, self.m, self.shape = n, m, torch.Size(shape)
        cands = candidates(n, m, device=device)
        # drawn in fp32 whatever the dtype: the same init, rounded, for bf16 logits
        logits = torch.empty(out_f * in_f // m, cands.shape[0], dtype=torch.float32, device=device)
        self.logits = nn.Parameter(logits.normal_(0.0, init_std, generator=generator).to(dtype))
        self.register_buffer("cands", cands, persistent=False)  # (C, M), rebuilt, never saved
        self.noise = noise or NoiseSource()
        self.tau, self.kappa = 4.0, 1e2
        self.sq_norm: torch.Tensor | None = None

    def soft_mask(self) -> torch.Tensor:
        """``(G, M)`` fp32: a Gumbel-softmax sample of candidate weights times the candidates."""
        return gumbel_soft_mask(self.logits, self.cands, self.kappa, self.tau,
                                self.noise.generator(self.logits.device))

    def choice(self) -> torch.Tensor:
        """``(G,)`` index of each group's most likely candidate."""
        return self.logits.detach().argmax(dim=-1)

    def hard_mask(self) -> torch.Tensor:
        """``(out, in)`` bool keep-mask: each group's argmax candidate (exactly N of every M)."""
        return self.cands[self.choice()].bool().view(self.shape)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return W * self.hard_mask().to(W.dtype)
        mask = self.soft_mask().view(self.shape)
        self.sq_norm = masked_sq_norm(W, mask)
        return W * mask.to(W.dtype)


def check_divisible(model: nn.Module, m: int, n: int | None = None) -> None:
    """Refuse a model with a masked linear whose in-features M does not divide."""
    for name, lin in masked_linears(model).items():
        if lin.in_features % m:
            pat = f"{n}:{m}" if n else f"M={m}"
            raise LLMPruneError(f"{name} has {lin.in_features} input features, not divisible by M={m} "
                                f"of the {pat} pattern; choose an M that divides it")


def attach_masks(model: nn.Module, n: int, m: int, init_std: float = 0.01, seed: int = 0,
                 noise: NoiseSource | None = None, train_weights: bool = False,
                 logits_dtype: torch.dtype = torch.float32) -> dict[str, LearnableNMMask]:
    """Put a :class:`LearnableNMMask` on the weight of every decoder linear.

    Returns the masks keyed by weight name (``model.layers.0.mlp.down_proj.weight``). Logits
    (``logits_dtype``) are initialised from one generator seeded with ``seed``, in module
    order. Weights are frozen unless ``train_weights``.
    """
    check_divisible(model, m, n)
    noise = noise or NoiseSource(seed)
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, lin in masked_linears(model).items():
        if parametrize.is_parametrized(lin, "weight"):
            raise LLMPruneError(f"{name}.weight already carries a parametrization (masks attached twice?)")
        device = lin.weight.device
        # Draw on the CPU so the init is the same whatever the device.
        mask = LearnableNMMask(lin.weight.shape, n, m, init_std, gen, noise, device="cpu",
                               dtype=logits_dtype).to(device)
        mask.train(model.training)
        lin.weight.requires_grad_(train_weights)
        # unsafe: skip the registration's trial forward (it would draw noise and build a graph)
        parametrize.register_parametrization(lin, "weight", mask, unsafe=True)
        masks[f"{name}.weight"] = mask
    return masks


def find_masks(model: nn.Module) -> dict[str, LearnableNMMask]:
    """The masks attached by :func:`attach_masks`, keyed by weight name."""
    out = {}
    for name, lin in masked_linears(model).items():
        if parametrize.is_parametrized(lin, "weight"):
            out[f"{name}.weight"] = lin.parametrizations.weight[0]
    return out


def hard_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{weight name: (out, in) bool keep-mask}`` of every attached mask (on the CPU)."""
    return {name: mask.hard_mask().cpu() for name, mask in find_masks(model).items()}


def detach_masks(model: nn.Module, apply: bool = True) -> dict[str, torch.Tensor]:
    """Remove the parametrizations; with ``apply`` the weights become ``W ⊙ hard mask``.

    Returns the hard masks. The weights get back ``requires_grad=True`` (nn.Linear's default).
    """
    out = {}
    for name, lin in masked_linears(model).items():
        if not parametrize.is_parametrized(lin, "weight"):
            continue
        keep = lin.parametrizations.weight[0].hard_mask()
        parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
        with torch.no_grad():
            if apply:
                lin.weight.mul_(keep.to(lin.weight.dtype))
        lin.weight.requires_grad_(True)
        out[f"{name}.weight"] = keep.cpu()
    return out
