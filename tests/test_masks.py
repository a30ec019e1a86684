"""Masks as values: MaskLLM's npz layout, checks, comparison, apply, and the ``masks`` command."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model

import llmprune
from llmprune.cli import main
from llmprune.errors import LLMPruneError
from llmprune.masks import MaskSet, param_shapes, prunable_names
from llmprune.masks import files as mfiles
from llmprune.sparsity.patterns import Target, nm_mask


def random_masks(seed=0):
    g = torch.Generator().manual_seed(seed)
    # odd sizes (packbits pads the last byte) and a fused 3D expert-like tensor
    return {"a.weight": torch.rand(7, 13, generator=g) > 0.5,
            "b.weight": torch.rand(16, 64, generator=g) > 0.3,
            "experts.down": torch.rand(3, 5, 8, generator=g) > 0.5}


def shapes_of(masks):
    return {n: tuple(m.shape) for n, m in masks.items()}


def pruned_tiny(pattern="2:4"):
    model = tiny_model("llama")
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    llmprune.prune(model, method="wanda", pattern=pattern, nsamples=4, seqlen=32, device="cpu",
                   calib_ids=ids, progress=False)
    return model


def test_npz_round_trip_bit_exact(tmp_path):
    masks = random_masks()
    f = MaskSet(masks).save(tmp_path / "m.npz")
    with np.load(f, allow_pickle=False) as z:  # the published layout, readable by plain numpy
        assert sorted(z.files) == sorted(n + ".mask" for n in masks)
        for n, m in masks.items():
            assert np.array_equal(z[n + ".mask"], np.packbits(m.numpy().flatten()))
    back = MaskSet.load(f, shapes_of(masks))
    assert set(back) == set(masks)
    for n, m in masks.items():
        assert back[n].dtype == torch.bool and torch.equal(back[n], m)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_plain_numpy_file_applies_exactly(tmp_path):
    model = tiny_model("llama")
    names = prunable_names(model)
    assert names and all(n.startswith("model.layers.") and n.endswith(".weight") for n in names)
    params = dict(model.named_parameters())
    rng = np.random.default_rng(0)
    masks = {n: rng.random(tuple(params[n].shape)) > 0.4 for n in names[:3]}
    before = {n: params[n].detach().clone() for n in names}
    f = tmp_path / "maskllm.npz"
    np.savez_compressed(f, **{n + ".mask": np.packbits(m.flatten()) for n, m in masks.items()})
    MaskSet.load(f, model).apply(model)
    for n in names:
        w = params[n].detach()
        if n in masks:
            keep = torch.from_numpy(masks[n])
            assert torch.equal(w[keep], before[n][keep]) and (w[~keep] == 0).all()
        else:
            assert torch.equal(w, before[n])


def test_pickled_object_array_refused(tmp_path):
    f = tmp_path / "evil.npz"
    np.savez(f, **{"a.weight.mask": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(LLMPruneError, match=r"'a\.weight\.mask'.*pickled"):
        mfiles.read_packed(f)


@pytest.mark.parametrize("content,shapes,msg", [
    ({"a.weight": np.packbits(np.ones(16, bool))}, {"a.weight": (4, 4)}, "not '<parameter name>.mask'"),
    ({"x.weight.mask": np.packbits(np.ones(16, bool))}, {"a.weight": (4, 4)}, r"'x\.weight\.mask' names no parameter"),
    ({"a.weight.mask": np.packbits(np.ones(24, bool))}, {"a.weight": (4, 4)}, r"'a\.weight\.mask' has 3 packed bytes"),
    ({"a.weight.mask": np.packbits(np.ones(16, bool))}, {"a.weight": (8, 8)}, r"'a\.weight\.mask'.*shape \(8, 8\)"),
    ({"a.weight.mask": np.ones(2, np.int32)}, {"a.weight": (4, 4)}, r"'a\.weight\.mask' is int32"),
])
def test_bad_files_refused_naming_the_key(tmp_path, content, shapes, msg):
    f = tmp_path / "bad.npz"
    np.savez_compressed(f, **content)
    with pytest.raises(LLMPruneError, match=msg):
        MaskSet.load(f, shapes)


def test_not_an_npz_refused(tmp_path):
    f = tmp_path / "junk.npz"
    f.write_text("hello")
    with pytest.raises(LLMPruneError, match="not a .npz mask file"):
        mfiles.read_packed(f)


def test_apply_refuses_shape_mismatch_before_touching_weights():
    model = tiny_model("llama")
    names = prunable_names(model)
    params = dict(model.named_parameters())
    good = {names[0]: torch.zeros_like(params[names[0]], dtype=torch.bool)}
    bad = {names[1]: torch.zeros(3, 3, dtype=torch.bool)}
    before = params[names[0]].detach().clone()
    with pytest.raises(LLMPruneError, match=names[1].replace(".", r"\.")):
        MaskSet({**good, **bad}).apply(model)
    assert torch.equal(params[names[0]].detach(), before)  # nothing zeroed yet


def test_nm_check_catches_a_violation():
    ok = nm_mask(torch.rand(8, 32), 2, 4)
    broken = ok.clone()
    broken[5, 9] = ~broken[5, 9]  # group 2 of row 5 now keeps 1 or 3
    ms = MaskSet({"ok.weight": ok, "broken.weight": broken})
    assert ms.violations(Target.nm(2, 4)).keys() == {"broken.weight"}
    with pytest.raises(LLMPruneError, match=r"broken\.weight breaks 2:4.*row 5, inputs 8\.\.11"):
        ms.check(Target.nm(2, 4))
    MaskSet({"ok.weight": ok}).check(Target.nm(2, 4))
    with pytest.raises(LLMPruneError, match="not a multiple of M=8"):
        MaskSet({"odd": torch.ones(2, 12, dtype=torch.bool)}).check(Target.nm(4, 8))


def test_unstructured_check_and_summary():
    m = torch.zeros(10, 10, dtype=torch.bool)
    m[:, :4] = True  # 60% sparse, not N:M (rows start with 4 kept then 0 in groups of 4)
    ms = MaskSet({"w": m})
    ms.check(Target.unstructured(0.6))
    with pytest.raises(LLMPruneError, match="sparsity 0.6000 is not 0.5"):
        ms.check(Target.unstructured(0.5))
    s = ms.summary()
    assert s["sparsity"] == pytest.approx(0.6) and s["nm"] is None and s["per_key"]["w"]["kept"] == 40
    nm = MaskSet({"a": nm_mask(torch.rand(4, 16), 2, 4), "b": nm_mask(torch.rand(3, 8), 2, 4)})
    assert nm.summary()["nm"] == "2:4" and nm.nm() == (2, 4) and nm.sparsity == pytest.approx(0.5)


def test_compare_counts_agreement_and_hamming():
    a = torch.ones(4, 8, dtype=torch.bool)
    b = a.clone()
    b[0, :3] = False
    res = MaskSet({"w": a, "only_a": a}).compare(MaskSet({"w": b, "only_b": b}))
    assert res["hamming"] == 3 and res["agreement"] == pytest.approx(1 - 3 / 32)
    assert res["per_key"]["w"]["hamming"] == 3
    assert res["only_here"] == ["only_a"] and res["only_other"] == ["only_b"]
    with pytest.raises(LLMPruneError, match="shape"):
        MaskSet({"w": a}).compare(MaskSet({"w": torch.ones(8, 4, dtype=torch.bool)}))


def test_from_model_of_a_24_pruned_model_passes_the_check():
    model = pruned_tiny("2:4")
    ms = MaskSet.from_model(model)
    assert len(ms) == len(prunable_names(model)) == 2 * 7
    ms.check(Target.nm(2, 4))
    assert ms.nm() == (2, 4) and ms.sparsity == pytest.approx(0.5)
    with pytest.raises(LLMPruneError, match="breaks 1:4"):
        ms.check(Target.nm(1, 4))


def test_apply_then_from_model_round_trip(tmp_path):
    source = MaskSet.from_model(pruned_tiny("2:4"))
    f = source.save(tmp_path / "m.npz")
    fresh = tiny_model("llama", seed=1)
    MaskSet.load(f, param_shapes(fresh)).apply(fresh)
    back = MaskSet.from_model(fresh)
    assert back.compare(source)["hamming"] == 0


def test_from_dict_refuses_non_binary():
    MaskSet.from_dict({"w": np.array([[0, 1], [1, 0]], dtype=np.uint8)})
    with pytest.raises(LLMPruneError, match="values other than 0/1"):
        MaskSet.from_dict({"w": np.array([0.5, 1.0])})


def test_param_shapes_on_meta_model(tiny_dirs):
    from llmprune.masks.commands import model_shapes

    shapes = model_shapes(str(tiny_dirs["llama"]))
    assert shapes == param_shapes(tiny_model("llama"))


# -- the command ----------------------------------------------------------------------------

def test_cli_export_apply_inspect(tiny_dirs, tmp_path, capsys):
    model_dir = str(tiny_dirs["llama"])
    pruned = tmp_path / "pruned"
    assert main(["prune", model_dir, "--method", "magnitude", "--pattern", "2:4", "--out", str(pruned), "-q"]) == 0
    masks = tmp_path / "m.npz"
    assert main(["masks", "export", str(pruned), "--out", str(masks)]) == 0
    assert "every mask 2:4" in capsys.readouterr().out

    out = tmp_path / "applied"
    assert main(["masks", "apply", model_dir, str(masks), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["masks"]["nm"] == "2:4" and report["sparsity"] == pytest.approx(0.5)
    assert json.loads((out / "pruning.json").read_text())["masks"]["per_key"]
    assert main(["report", str(out)]) == 0
    assert "masks from" in capsys.readouterr().out
    a = MaskSet.load(masks, param_shapes(tiny_model("llama")))
    from llmprune.models.loading import load_model
    assert MaskSet.from_model(load_model(str(out))[0]).compare(a)["hamming"] == 0

    assert main(["masks", "inspect", str(masks), "--model", model_dir, "--pattern", "2:4",
                 "--against", str(masks)]) == 0
    text = capsys.readouterr().out
    assert "check 2:4: ok" in text and "agreement 1.0000" in text
    assert main(["masks", "inspect", str(masks), "--model", model_dir, "--pattern", "1:4"]) == 1
    assert "violate it" in capsys.readouterr().out
    assert main(["masks", "inspect", str(masks), "--pattern", "2:4", "--json"]) == 2  # an N:M check needs shapes
    assert "pass --model" in capsys.readouterr().err
    assert main(["masks", "inspect", str(masks), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["shapes_known"] is False and res["sparsity_approx"] == pytest.approx(0.5)


def test_cli_errors_are_one_line(tiny_dirs, tmp_path, capsys):
    f = tmp_path / "bad.npz"
    np.savez_compressed(f, **{"model.layers.0.mlp.down_proj.weight.mask": np.zeros(3, np.uint8)})
    rc = main(["masks", "apply", str(tiny_dirs["llama"]), str(f), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "model.layers.0.mlp.down_proj.weight.mask" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.lock").exists()
    rc = main(["masks", "inspect", str(tmp_path / "missing.npz")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
