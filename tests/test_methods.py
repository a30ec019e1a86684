"""Methods against brute-force references on small matrices."""

import pytest
import torch

from llmprune.sparsity.methods import prune_weight
from llmprune.sparsity.numerics import NumericalWarning
from llmprune.sparsity.patterns import Target
from llmprune.sparsity.sparsegpt import sparsegpt


def calib(tokens=256, cols=32, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g, dtype=dtype) * torch.linspace(0.1, 3, cols, dtype=dtype)
    # correlated inputs, as real activations are: this is where the OBS update pays off
    X = X @ (torch.eye(cols, dtype=dtype) + torch.randn(cols, cols, generator=g, dtype=dtype) / cols**0.5)
    return X, X.T @ X


def recon_error(W, W_new, H):
    D = (W - W_new).double()
    return torch.einsum("ij,jk,ik->", D, H.double(), D).item()


def test_wanda_matches_bruteforce():
    torch.manual_seed(0)
    W = torch.randn(8, 32)
    X, H = calib(dtype=torch.float32)
    stats = {"col_sq": (X * X).sum(0)}
    [(W_new, keep)] = prune_weight("wanda", [W], stats, Target.unstructured(0.5))
    norms = [sum(float(X[t, j]) ** 2 for t in range(X.shape[0])) ** 0.5 for j in range(32)]
    for i in range(8):
        score = sorted(range(32), key=lambda j: abs(float(W[i, j])) * norms[j])
        expect_pruned = set(score[:16])
        assert {j for j in range(32) if not keep[i, j]} == expect_pruned
    assert torch.equal(W_new, W * keep)


def test_magnitude_is_per_matrix():
    torch.manual_seed(0)
    W = torch.randn(8, 32)
    [(W_new, keep)] = prune_weight("magnitude", [W], {}, Target.unstructured(0.25))
    thresh = W.abs().flatten().sort().values[64]
    assert torch.equal(keep, W.abs() >= thresh)
    assert (W_new == 0).sum() == 64


def sparsegpt_reference(W, H, target=None, mask=None, blocksize=8, percdamp=0.01):
    """Textbook OBS, one column at a time with an explicit inverse of the remaining Hessian."""
    W = W.clone().double()
    H = H.clone().double()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H = H + percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    rows, cols = W.shape
    keep = torch.ones(rows, cols, dtype=torch.bool) if mask is None else mask.clone()

    def d2(j):  # [H_F⁻¹]_jj with F = {j, ..., cols-1}
        return torch.linalg.inv(H[j:, j:])[0, 0]

    for i in range(cols):
        if target is not None and not target.is_nm and i % blocksize == 0:
            end = min(i + blocksize, cols)
            score = torch.stack([W[:, j] ** 2 / d2(j) for j in range(i, end)], 1)
            k = int(score.numel() * target.sparsity)
            flat = torch.ones(score.numel(), dtype=torch.bool)
            flat[score.flatten().argsort()[:k]] = False
            keep[:, i:end] = flat.view_as(score)
        if target is not None and target.is_nm and i % target.m == 0:
            score = torch.stack([W[:, j] ** 2 / d2(j) for j in range(i, i + target.m)], 1)
            top = score.argsort(dim=1, descending=True)[:, : target.n]
            keep[:, i : i + target.m] = torch.zeros_like(score, dtype=torch.bool).scatter_(1, top, True)
        Hinv = torch.linalg.inv(H[i:, i:])
        q = W[:, i] * keep[:, i]
        err = (W[:, i] - q) / Hinv[0, 0]
        W[:, i:] -= err.unsqueeze(1) * Hinv[0].unsqueeze(0)
        W[:, i] = q
    return W, keep


@pytest.mark.parametrize("target", [Target.unstructured(0.5), Target.nm(2, 4), Target.unstructured(0.7)])
def test_sparsegpt_matches_textbook_obs(target):
    torch.manual_seed(1)
    W = torch.randn(6, 32, dtype=torch.float64)
    _, H = calib()
    ref_W, ref_keep = sparsegpt_reference(W, H, target=target, blocksize=8)
    W_new, keep = sparsegpt(W, H.float(), target=target, blocksize=8)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(W_new.double(), ref_W, rtol=1e-3, atol=1e-4)


def test_sparsegpt_fixed_mask_solver_matches_reference():
    torch.manual_seed(2)
    W = torch.randn(6, 32, dtype=torch.float64)
    _, H = calib(seed=3)
    mask = torch.rand(6, 32) > 0.6
    ref_W, _ = sparsegpt_reference(W, H, mask=mask)
    W_new, keep = sparsegpt(W, H.float(), mask=mask, blocksize=8)
    assert torch.equal(keep, mask)
    assert ((W_new == 0) | keep).all() and (W_new[~keep] == 0).all()
    torch.testing.assert_close(W_new.double(), ref_W, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("target", [Target.unstructured(0.5), Target.nm(2, 4)])
def test_sparsegpt_update_beats_mask_only(target):
    torch.manual_seed(3)
    W = torch.randn(16, 64)
    _, H = calib(cols=64, dtype=torch.float32)
    [(W_upd, keep_upd)] = prune_weight("sparsegpt", [W], {"xtx": H}, target)
    [(W_mask, keep_mask)] = prune_weight("sparsegpt", [W], {"xtx": H}, target, solver="none")
    assert torch.equal(keep_upd, keep_mask)
    assert torch.equal(W_mask, W * keep_mask)
    assert recon_error(W, W_upd, H) < 0.9 * recon_error(W, W_mask, H)


def test_stacked_group_equals_separate_calls():
    torch.manual_seed(4)
    _, H = calib(cols=32, dtype=torch.float32)
    Ws = [torch.randn(r, 32) for r in (8, 4, 4)]
    for target in (Target.unstructured(0.6), Target.nm(2, 4)):
        stacked = prune_weight("sparsegpt", Ws, {"xtx": H}, target)
        for W, (W_s, k_s) in zip(Ws, stacked, strict=True):
            [(W_1, k_1)] = prune_weight("sparsegpt", [W], {"xtx": H}, target)
            assert torch.equal(k_s, k_1)
            torch.testing.assert_close(W_s, W_1, rtol=1e-4, atol=1e-5)


def test_wanda_with_sparsegpt_solver_reduces_error():
    torch.manual_seed(5)
    W = torch.randn(16, 64)
    X, H = calib(cols=64, dtype=torch.float32)
    stats = {"col_sq": torch.diagonal(H), "xtx": H}
    [(W_plain, keep)] = prune_weight("wanda", [W], stats, Target.nm(2, 4))
    [(W_upd, keep2)] = prune_weight("wanda", [W], stats, Target.nm(2, 4), solver="sparsegpt")
    assert torch.equal(keep, keep2)
    assert (W_upd[~keep] == 0).all()
    assert recon_error(W, W_upd, H) < recon_error(W, W_plain, H)


def test_singular_hessian_gives_finite_weights():
    torch.manual_seed(6)
    X = torch.randn(4, 32)  # 4 tokens for 32 inputs: rank 4
    X[:, 5] = 0  # and a dead input
    H = X.T @ X
    W = torch.randn(8, 32)
    with pytest.warns(NumericalWarning, match="solved with 0.0001"):  # said, not silent
        W_new, keep = sparsegpt(W, H, target=Target.unstructured(0.5), percdamp=0.0)
    assert torch.isfinite(W_new).all()
    assert (W_new[:, 5] == 0).all()
    assert (~keep).sum() == sum(int(8 * min(128, 32) * 0.5) for _ in range(1))
