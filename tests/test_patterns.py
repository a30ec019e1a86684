import pytest
import torch

from llmprune.errors import LLMPruneError
from llmprune.sparsity.patterns import Target, nm_mask, unstructured_mask


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_unstructured_row_mask_exact_per_row(sparsity):
    s = torch.rand(37, 53)
    keep = unstructured_mask(s, sparsity, per="row")
    assert (keep.sum(1) == 53 - int(53 * sparsity)).all()
    # the pruned ones are exactly the lowest scores of their row
    for r in range(37):
        pruned = s[r][~keep[r]]
        kept = s[r][keep[r]]
        if pruned.numel() and kept.numel():
            assert pruned.max() < kept.min()


def test_unstructured_matrix_mask_exact():
    s = torch.rand(31, 17)
    keep = unstructured_mask(s, 0.6, per="matrix")
    assert (~keep).sum() == int(31 * 17 * 0.6)
    assert s[~keep].max() < s[keep].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (5, 8), (3, 7)])
def test_nm_mask_every_group(n, m):
    s = torch.rand(9, m * 6)
    keep = nm_mask(s, n, m)
    groups = keep.reshape(9, 6, m)
    assert (groups.sum(-1) == n).all()
    sg = s.reshape(9, 6, m)
    assert (sg.masked_fill(~groups, -1).amax(-1) >= 0).all()
    # kept are the top-n of each group
    kept_min = sg.masked_fill(~groups, 2).amin(-1)
    pruned_max = sg.masked_fill(groups, -1).amax(-1)
    assert (kept_min > pruned_max).all()


def test_target_parse():
    assert Target.parse("2:4", None) == Target(0.5, 2, 4)
    assert Target.parse(None, 0.7).sparsity == 0.7
    assert str(Target.parse(" 4 : 8 ", None)) == "4:8"
    for bad in ["4:4", "5:4", "0:4", "2-4", "a:b"]:
        with pytest.raises(LLMPruneError):
            Target.parse(bad, None)
    for bad in [1.0, -0.1, 1.5]:
        with pytest.raises(LLMPruneError):
            Target.parse(None, bad)
    with pytest.raises(LLMPruneError, match="divisible"):
        Target.parse("2:4", None).check_shape(30, "x")
