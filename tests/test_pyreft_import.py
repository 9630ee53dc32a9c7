"""Importing pyreft LoReFT checkpoints: identical outputs to the pyreft formula with the saved tensors."""

import json

import pytest
import torch
from conftest import padded_batch, tiny_model
from peft import PeftModel
from reference import reference_logits

from peft_reft import from_pyreft


def write_pyreft_checkpoint(folder, layers, groups, hidden=32, rank=3, dtype=torch.bfloat16, seed=0,
                            component="block_output"):
    """The layout pyreft's ReftModel.save writes: config.json and one intkey_<key>.bin per LoReFT intervention,
    whose state dict is {rotate_layer: R^T [d, r], weight: W [r, d], bias: b [r]} (W, b in bf16 by default)."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer in layers:
        for k in range(groups):
            rotation_t, _ = torch.linalg.qr(torch.randn(hidden, rank, generator=g))
            state = {"rotate_layer": rotation_t, "weight": (torch.randn(rank, hidden, generator=g) * 2).to(dtype),
                     "bias": torch.randn(rank, generator=g).to(dtype)}
            torch.save(state, folder / f"intkey_layer_{layer}_comp_{component}_unit_pos_nunit_1#{k}.bin")
            tensors[(layer, k)] = state
    (folder / "config.json").write_text(json.dumps({"representations": [
        {"layer": layer, "component": component, "low_rank_dimension": rank} for layer in layers]}))
    return tensors


def _as_reference_params(tensors):
    params = {}
    for (layer, k), state in tensors.items():
        params.setdefault(layer, {})["first" if k == 0 else "last"] = {
            "rotate_layer.weight": state["rotate_layer"].T.double(),
            "learned_source.weight": state["weight"].double(), "learned_source.bias": state["bias"].double()}
    return params


@pytest.mark.parametrize("positions,groups,component", [
    ("f2+l2", 2, "block_output"), ("l3", 1, "block_output"), ("f2+l2", 2, "mlp_output"),
    ("l3", 1, "attention_output"),
])
def test_imported_checkpoint_matches_the_pyreft_formula_and_round_trips(tmp_path, positions, groups, component):
    tensors = write_pyreft_checkpoint(tmp_path / "pyreft", layers=[1, 3], groups=groups, component=component)
    model = from_pyreft(tiny_model(), tmp_path / "pyreft", positions=positions).eval()
    ids, mask = padded_batch([7, 4], side="left", seed=5)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    first, last = (2, 2) if groups == 2 else (0, 3)
    submodule = {"block_output": None, "mlp_output": "mlp", "attention_output": "self_attn"}[component]
    expected = reference_logits(tiny_model(), _as_reference_params(tensors), "loreft", ids, mask, None, first, last,
                                share_weights=groups == 1, submodule=submodule)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=2e-5, rtol=1e-4)
    model.save_pretrained(tmp_path / "peft")  # now a normal peft adapter: safetensors + JSON
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "peft")(input_ids=ids, attention_mask=mask)
    assert torch.equal(loaded.logits, got)


def test_trainer_layout_and_errors(tmp_path):
    tensors = write_pyreft_checkpoint(tmp_path / "run" / "intervenable_model", layers=[0], groups=2)  # the Trainer's
    model = from_pyreft(tiny_model(), tmp_path / "run", positions="f1+l1")
    imported = model.base_model.model.model.layers[0].reft_interventions["default"]
    for k in (0, 1):
        assert torch.equal(imported[k].learned_source.weight, tensors[(0, k)]["weight"].float())
    with pytest.raises(ValueError, match=r"positions='l1' needs 1 intervention\(s\) per layer, the checkpoint has 2"):
        from_pyreft(tiny_model(), tmp_path / "run", positions="l1")
    with pytest.raises(ValueError, match="No pyreft intervention files"):
        from_pyreft(tiny_model(), tmp_path / "empty", positions="l1")
    folder = tmp_path / "noreft"
    folder.mkdir()
    name = "intkey_layer_0_comp_block_output_unit_pos_nunit_1#0.bin"
    torch.save({"learned_source.weight": torch.zeros(3, 32)}, folder / name)  # a NoReFT-style state dict
    with pytest.raises(ValueError, match="only LoReFT checkpoints"):
        from_pyreft(tiny_model(), folder, positions="l1")
    write_pyreft_checkpoint(tmp_path / "mixed", layers=[0], groups=1, component="mlp_output")
    write_pyreft_checkpoint(tmp_path / "mixed", layers=[1], groups=1)
    with pytest.raises(ValueError, match=r"mixes components \['block_output', 'mlp_output'\]"):
        from_pyreft(tiny_model(), tmp_path / "mixed", positions="l1")
    write_pyreft_checkpoint(tmp_path / "value", layers=[0], groups=1, component="value_output")
    with pytest.raises(ValueError, match=r"component 'value_output' is not supported; use one of \('block_output'"):
        from_pyreft(tiny_model(), tmp_path / "value", positions="l1")


BAD_TENSORS = [
    ("bias", torch.zeros(1), r"`bias` has shape \[1\] .*expected a float tensor of shape \[3\]"),
    ("rotate_layer", torch.zeros(1, 3), r"`rotate_layer` has shape \[1, 3\] .*of shape \[32, 3\] \(hidden size 32"),
    ("weight", torch.zeros(3, 1), r"`weight` has shape \[3, 1\] .*of shape \[3, 32\]"),
    ("weight", torch.zeros(3, 32, dtype=torch.long), r"`weight` has shape \[3, 32\] \(torch.int64\); expected a float"),
]


@pytest.mark.parametrize("key,tensor,message", BAD_TENSORS, ids=[b[0] + str(i) for i, b in enumerate(BAD_TENSORS)])
def test_a_bad_tensor_is_named_and_the_base_model_is_left_alone(tmp_path, key, tensor, message):
    write_pyreft_checkpoint(tmp_path / "ckpt", layers=[0, 1], groups=1)
    file = tmp_path / "ckpt" / "intkey_layer_1_comp_block_output_unit_pos_nunit_1#0.bin"
    state = torch.load(file, weights_only=True)
    state[key] = tensor
    torch.save(state, file)
    base = tiny_model()
    before = {n: p.clone() for n, p in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"intervention #0 at layer 1: " + message):
        from_pyreft(base, tmp_path / "ckpt", positions="l1")
    assert not any("reft" in name for name, _ in base.named_modules())  # nothing injected
    assert all(torch.equal(p, before[n]) for n, p in base.state_dict().items())


def test_checkpoints_that_do_not_fit_the_model_are_refused(tmp_path):
    write_pyreft_checkpoint(tmp_path / "wide", layers=[0], groups=1, hidden=64)
    with pytest.raises(ValueError, match=r"`rotate_layer` has shape \[64, 3\] .*\[32, 3\] \(hidden size 32 of the "):
        from_pyreft(tiny_model(), tmp_path / "wide", positions="l1")
    write_pyreft_checkpoint(tmp_path / "deep", layers=[9], groups=1)
    with pytest.raises(ValueError, match=r"The checkpoint's layer list \[9\] has index\(es\) \[9\] out of range: "
                                         r"LlamaForCausalLM has 4 layers \(valid indices 0..3\)"):
        from_pyreft(tiny_model(), tmp_path / "deep", positions="l1")
    write_pyreft_checkpoint(tmp_path / "ranks", layers=[0], groups=1, rank=3)
    write_pyreft_checkpoint(tmp_path / "ranks", layers=[1], groups=1, rank=2)
    with pytest.raises(ValueError, match=r"intervention #0 at layer 1: `rotate_layer` has shape \[32, 2\]"):
        from_pyreft(tiny_model(), tmp_path / "ranks", positions="l1")
    folder = tmp_path / "missing"
    write_pyreft_checkpoint(folder, layers=[0, 1], groups=2)
    (folder / "intkey_layer_1_comp_block_output_unit_pos_nunit_1#1.bin").unlink()
    with pytest.raises(ValueError, match=r"Every layer must have intervention #0, or #0 and #1; the checkpoint has "
                                         r"\{0: \[0, 1\], 1: \[0\]\}"):
        from_pyreft(tiny_model(), folder, positions="f1+l1")
