"""ReFT + LoRA in one model (`ReftConfig.lora_config`): numbers against a by-hand reference, training, save/load,
adapter switching, mixed batches, generation and the options the LoRA part refuses."""

import json

import pytest
import torch
from conftest import greedy_by_hand, padded_batch, tiny_config, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from reference import raw_params, reference_logits
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from peft_reft import ReftConfig, ReftLayer

TARGETS = ("q_proj", "v_proj", "down_proj")


def config(layers=(1, 2), lora_targets=TARGETS, **kwargs):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=list(lora_targets), init_lora_weights=False)
    return ReftConfig(**{"layers": list(layers), "low_rank_dimension": 2, "positions": "f1+l1",
                         "share_weights": False, "init_weights": False, "lora_config": lora, **kwargs})


def lora_weights(peft_model, adapter="default"):
    """{module path as in the bare model: (A, B)} read from the state dict (ReFT-wrapped layers add `.base_layer.`)."""
    pairs = {}
    for key, value in peft_model.state_dict().items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.{adapter}.weight"
            if key.endswith(marker):
                path = key[: -len(marker)].removeprefix("base_model.model.").replace(".base_layer.", ".")
                pairs.setdefault(path, {})[part] = value.detach().clone()
    return {path: (p["lora_A"], p["lora_B"]) for path, p in pairs.items()}


def with_lora_by_hand(base_model, weights, scaling):
    """Hooks that add `scaling * B A x` to the output of each adapted linear layer of the bare model."""
    modules = dict(base_model.named_modules())
    handles = []
    for path, (a, b) in weights.items():
        def hook(module, args, output, a=a, b=b):
            return output + scaling * (args[0] @ a.T @ b.T)
        handles.append(modules[path].register_forward_hook(hook))
    return handles


def reference(peft_model, base_model, ids, mask, adapter="default", kind="loreft"):
    handles = with_lora_by_hand(base_model, lora_weights(peft_model, adapter), scaling=8 / 4)
    try:
        return reference_logits(base_model, raw_params(peft_model, adapter), kind, ids, mask, None, 1, 1,
                                share_weights=False)
    finally:
        for handle in handles:
            handle.remove()


def test_logits_equal_reft_and_lora_applied_by_hand():
    model = get_peft_model(tiny_model(), config()).eval()
    ids, mask = padded_batch([9, 6, 4])
    weights = lora_weights(model)
    assert sorted(weights) == sorted(f"model.layers.{i}.{sub}.{name}" for i in range(4)
                                     for sub, name in [("self_attn", "q_proj"), ("self_attn", "v_proj"),
                                                       ("mlp", "down_proj")])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    expected = reference(model, tiny_model(), ids, mask)
    attended = mask.bool()
    torch.testing.assert_close(logits[attended], expected[attended], atol=2e-5, rtol=1e-5)
    # both parts matter: without the LoRA part, or without the ReFT edits, the logits differ
    bare_reft = reference_logits(tiny_model(), raw_params(model), "loreft", ids, mask, None, 1, 1, False)
    assert (logits[attended] - bare_reft[attended]).abs().max() > 1e-2
    with model.disable_adapter(), torch.no_grad():
        assert (model(input_ids=ids, attention_mask=mask).logits - tiny_model()(input_ids=ids).logits)[
            attended].abs().max() < 1e-5


def test_generate_edits_the_prompt_and_keeps_the_lora_part_in_every_step():
    model = get_peft_model(tiny_model(), config()).eval()
    prompt, _ = padded_batch([7], seed=3)
    locations = torch.tensor([[[0], [6]]])  # f1+l1 of the 7-token prompt, groups [first, last]
    generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                               do_sample=False)
    assert torch.equal(generated[:, 7:], greedy_by_hand(model, prompt, 6, locations))
    # the by-hand reference: whole sequence re-run with the prompt's edits and the LoRA part
    base, sequence = tiny_model(), prompt.clone()
    for _ in range(6):
        mask = torch.ones_like(sequence)
        prompt_only = reference_logits_prompt(model, base, sequence, mask, prompt_length=7)
        sequence = torch.cat([sequence, prompt_only[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, sequence)


def reference_logits_prompt(model, base, sequence, mask, prompt_length):
    """Reference logits of `sequence` whose first `prompt_length` tokens are the prompt: the edits sit on the
    prompt's first and last token (labels -100 on the prompt mark where it ends)."""
    labels = torch.full_like(sequence, -100)
    labels[:, prompt_length:] = sequence[:, prompt_length:]
    if sequence.shape[1] == prompt_length:
        labels = None
    handles = with_lora_by_hand(base, lora_weights(model), scaling=2.0)
    try:
        return reference_logits(base, raw_params(model), "loreft", sequence, mask, labels, 1, 1, False)
    finally:
        for handle in handles:
            handle.remove()


def test_training_moves_both_parts_and_nothing_else():
    model = get_peft_model(tiny_model(), config(init_weights=True, lora_config=LoraConfig(
        r=4, target_modules="all-linear"))).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".reft_interventions." in n or ".lora_A." in n or ".lora_B." in n for n in trainable)
    assert any(".lora_B." in n for n in trainable) and any(".reft_interventions." in n for n in trainable)
    # "all-linear" became the model's linear layers, the output head excepted, as with LoRA
    assert set(model.peft_config["default"].lora_config.target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = padded_batch([9, 8])
    labels = ids.clone()
    labels[:, :5] = -100
    for _ in range(3):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    # lora_A starts random and lora_B at zero: both move once B has moved; every intervention tensor moves
    assert moved == trainable


def test_save_and_load_round_trip(tmp_path):
    model = get_peft_model(tiny_model(), config(lora_config=LoraConfig(
        r=4, target_modules="all-linear", init_lora_weights=False, use_dora=True))).eval()
    ids, mask = padded_batch([9, 5])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    # written out from the bare model: every linear layer but the head gets A, B and DoRA's magnitude, under its own
    # module path; each wrapped layer (1, 2) its two interventions' tensors
    linear = [name for name, module in tiny_model().named_modules()
              if isinstance(module, torch.nn.Linear) and name != "lm_head"]
    expected_keys = {f"base_model.model.{name}.{part}.weight" for name in linear
                     for part in ("lora_A", "lora_B", "lora_magnitude_vector")}
    expected_keys |= {f"base_model.model.model.layers.{layer}.reft_interventions.{group}.{tensor}"
                      for layer in (1, 2) for group in (0, 1)
                      for tensor in ("rotate_layer.weight", "learned_source.weight", "learned_source.bias")}
    assert set(saved) == expected_keys
    assert any(".lora_magnitude_vector." in k for k in saved)
    stored = json.loads((tmp_path / "adapter_config.json").read_text())
    assert stored["peft_type"] == "REFT" and stored["lora_config"]["peft_type"] == "LORA"
    assert stored["lora_config"]["use_dora"] is True and isinstance(stored["lora_config"]["target_modules"], list)

    for low_cpu_mem_usage in (False, True):  # True: adapter layers created on the meta device, then assigned
        loaded = PeftModel.from_pretrained(tiny_model(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        assert isinstance(loaded.peft_config["default"].lora_config, LoraConfig)
        assert loaded.state_dict().keys() == model.state_dict().keys()
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, model.state_dict()[key]), key
        assert not any(p.requires_grad for p in loaded.parameters())  # inference mode reaches the LoRA part
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, logits)
    trainable = PeftModel.from_pretrained(tiny_model(), tmp_path, is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in names) and any(".reft_interventions." in n for n in names)


def test_a_saved_adapter_loads_next_to_an_adapter_that_wraps_other_layers(tmp_path):
    """The LoRA part is saved under the model's own module paths, so it loads whichever layers other ReFT adapters
    have wrapped (here layer 0, which the loaded adapter's LoRA part adapts but its ReFT part does not wrap)."""
    alone = get_peft_model(tiny_model(), config(layers=[2])).eval()
    alone.save_pretrained(tmp_path / "b")
    ids, mask = padded_batch([8, 6])
    with torch.no_grad():
        expected = alone(input_ids=ids, attention_mask=mask).logits

    model = get_peft_model(tiny_model(), config(layers=[0, 1]), adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    model.set_adapter("b")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)
    # and adapter "a" (ReFT on layers 0-1, its own LoRA part) is untouched by "b"
    model.set_adapter("a")
    with torch.no_grad():
        logits_a = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits_a[mask.bool()], reference(model, tiny_model(), ids, mask, "a")[mask.bool()],
                               atol=2e-5, rtol=1e-5)


def test_switching_mixing_deleting_and_unloading():
    torch.manual_seed(1)
    model = get_peft_model(tiny_model(), config(), adapter_name="a")
    model.add_adapter("b", config(layers=[2], lora_targets=("k_proj",)))
    model.add_adapter("plain", ReftConfig(layers=[1], low_rank_dimension=2, positions="f1+l1", init_weights=False))
    model.eval()
    ids, mask = padded_batch([9, 7, 5])

    def run(adapter):
        model.set_adapter(adapter)
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    single = {name: run(name) for name in ("a", "b", "plain")}
    # "plain" has no LoRA part: no LoRA layer acts while it is active
    plain = reference_logits(tiny_model(), raw_params(model, "plain"), "loreft", ids, mask, None, 1, 1, False)
    torch.testing.assert_close(single["plain"][mask.bool()], plain[mask.bool()], atol=2e-5, rtol=1e-5)
    with model.disable_adapter(), torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits

    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=["b", "__base__", "a"]).logits
    for row, expected in enumerate([single["b"], base, single["a"]]):
        torch.testing.assert_close(mixed[row][mask[row].bool()], expected[row][mask[row].bool()],
                                   atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    model.delete_adapter("a")
    assert not any("a" in m.lora_A for m in model.modules() if isinstance(m, LoraLayer))
    assert sum(isinstance(m, LoraLayer) and "b" in m.lora_A for m in model.modules()) == 4
    unloaded = model.unload()
    assert not any(isinstance(m, (LoraLayer, ReftLayer)) for m in unloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(unloaded(input_ids=ids, attention_mask=mask).logits, base)


def test_sequence_classification_head_is_trained_whole_and_not_adapted():
    torch.manual_seed(0)
    llama_config = tiny_config()
    llama_config.num_labels = 3
    base = AutoModelForSequenceClassification.from_config(llama_config)
    model = get_peft_model(base, ReftConfig(task_type="SEQ_CLS", layers=[1], positions="l1",
                                            lora_config=LoraConfig(r=2, target_modules="all-linear")))
    assert "score" not in model.peft_config["default"].lora_config.target_modules
    assert not any(isinstance(m, LoraLayer) for n, m in model.named_modules() if ".score" in n)
    assert any(p.requires_grad for n, p in model.named_parameters() if "score.modules_to_save" in n)


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        (LoraConfig(bias="all"), r"lora_config sets \['bias'\], which the LoRA part of a ReFT adapter does not"),
        (LoraConfig(modules_to_save=["lm_head"]), r"sets \['modules_to_save'\].*on the ReftConfig itself"),
        (LoraConfig(trainable_token_indices=[1, 2]), r"sets \['trainable_token_indices'\]"),
        (LoraConfig(layer_replication=[(0, 2)]), r"sets \['layer_replication'\]"),
        (LoraConfig(init_lora_weights="pissa"), r"init_lora_weights='pissa' is not supported with ReFT"),
        ({"peft_type": "IA3", "target_modules": ["q_proj"]}, r"peft_type='IA3'; the part added to ReFT must be LoRA"),
        ({"r": 4, "no_such_option": 1}, r"fields \['no_such_option'\] that this peft's LoraConfig does not know"),
        ("q_proj", r"lora_config must be a peft.LoraConfig \(or its dict\), got str"),
    ],
)
def test_unsupported_lora_options_are_refused(lora, message):
    with pytest.raises(ValueError, match=message):
        ReftConfig(layers=[1], lora_config=lora)


def test_config_round_trips_through_json_and_copies_the_users_lora_config():
    lora = LoraConfig(r=4, target_modules={"q_proj", "v_proj"}, lora_dropout=0.1)
    reft = ReftConfig(layers=[1], lora_config=lora)
    assert reft.lora_config is not lora
    stored = json.loads(json.dumps(reft.to_dict()))
    assert stored["lora_config"]["target_modules"] == ["q_proj", "v_proj"]
    again = ReftConfig(**{k: v for k, v in stored.items()})
    assert again.lora_config.r == 4 and again.lora_config.lora_dropout == 0.1
    assert set(again.lora_config.target_modules) == {"q_proj", "v_proj"}
