"""The checks peft applies to its own tuners, on a ReFT PeftModel (offline, tiny models)."""

import warnings

import pytest
import torch
from conftest import padded_batch, tiny_config, tiny_model
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from peft.peft_model import PeftModelForCausalLM
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_reft import ReftConfig, ReftLayer, ReftModel


def _config(**kwargs):
    kwargs = {"layers": [1, 2], "low_rank_dimension": 3, "positions": "f2+l2", "share_weights": False,
              "init_weights": False, **kwargs}
    return ReftConfig(**kwargs)


def _batch():
    ids, mask = padded_batch([6, 4, 8], side="right", seed=3)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _logits(model, batch=None):
    with torch.no_grad():
        return model(**(batch or _batch())).logits


def test_get_peft_model_returns_causal_lm_peft_model_with_reft_tuner():
    model = get_peft_model(tiny_model(), _config())
    assert isinstance(model, PeftModelForCausalLM)
    assert isinstance(model.base_model, ReftModel)
    wrapped = [name for name, m in model.named_modules() if isinstance(m, ReftLayer)]
    assert wrapped == ["base_model.model.model.layers.1", "base_model.model.model.layers.2"]


@pytest.mark.parametrize(
    "kwargs,groups",
    [({}, 2), ({"share_weights": True}, 1), ({"positions": "l1"}, 1), ({"intervention": "consreft"}, 2)],
)
def test_trainable_parameter_count_equals_formula(kwargs, groups, capsys):
    d, r, layers = 32, 3, 2
    model = get_peft_model(tiny_model(), _config(**kwargs))
    per_intervention = (d * r + r) if kwargs.get("intervention") == "consreft" else (2 * d * r + r)
    expected = layers * groups * per_intervention
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected
    model.print_trainable_parameters()
    assert f"trainable params: {expected:,}" in capsys.readouterr().out


def test_only_intervention_parameters_receive_gradients():
    model = get_peft_model(tiny_model(), _config())
    model.train()
    model(**_batch()).loss.backward()
    for name, param in model.named_parameters():
        if ".reft_interventions." in name:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name


def test_disable_adapter_gives_base_logits_exactly_and_restores():
    base_logits = _logits(tiny_model())
    model = get_peft_model(tiny_model(), _config())
    adapted = _logits(model)
    assert (adapted - base_logits).abs().max() > 1e-3
    with model.disable_adapter():
        assert torch.equal(_logits(model), base_logits)
    assert torch.equal(_logits(model), adapted)


def test_identity_init_gives_base_logits():
    base_logits = _logits(tiny_model())
    model = get_peft_model(tiny_model(), _config(init_weights=True))
    torch.testing.assert_close(_logits(model), base_logits, atol=1e-5, rtol=0)


def test_save_and_load_round_trip(tmp_path):
    model = get_peft_model(tiny_model(), _config())
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert "library_name: peft" in (tmp_path / "README.md").read_text()
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert all(".reft_interventions." in key and ".default." not in key for key in saved)
    assert len(saved) == 2 * 2 * 3  # layers x interventions x (rotation, W, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "Found missing adapter keys"
        loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert torch.equal(_logits(loaded), expected)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode
    state = {k: v for k, v in loaded.state_dict().items() if "reft_" in k}
    assert len(state) == len(saved)


def test_load_adapter_under_another_name_and_low_cpu_mem_usage(tmp_path):
    model = get_peft_model(tiny_model(), _config())
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(tiny_model(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        result = loaded.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=low_cpu_mem_usage)
        assert result.missing_keys == [] and result.unexpected_keys == []
        assert not any(p.device.type == "meta" for p in loaded.parameters())
        assert torch.equal(_logits(loaded), expected)
        loaded.set_adapter("other")
        assert torch.equal(_logits(loaded), expected)


def test_auto_peft_model_for_causal_lm(tmp_path):
    tiny_model().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, _config())
    expected = _logits(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert torch.equal(_logits(loaded), expected)


def test_adapter_names_that_are_substrings_do_not_leak(tmp_path):
    model = get_peft_model(tiny_model(), _config(), adapter_name="default")
    for name in ("default2", "efaul"):
        model.add_adapter(name, _config(positions="l1", layers=[0]))
    model.save_pretrained(tmp_path)
    for name, layers, groups in (("default", 2, 2), ("default2", 1, 1), ("efaul", 1, 1)):
        folder = tmp_path if name == "default" else tmp_path / name
        saved = load_file(folder / "adapter_model.safetensors")
        assert len(saved) == layers * groups * 3, name
        params = {k: v for k, v in model.state_dict().items() if f".reft_interventions.{name}." in k}
        for key, value in params.items():
            saved_key = key.replace(f".reft_interventions.{name}.", ".reft_interventions.")  # peft's file layout
            assert torch.equal(saved[saved_key], value)


def test_add_set_and_delete_adapter():
    model = get_peft_model(tiny_model(), _config())
    first = _logits(model)
    model.add_adapter("second", _config(layers=[0], positions="l1"))
    assert torch.equal(_logits(model), first)  # adding does not activate
    second_params = [p for n, p in model.named_parameters() if ".second." in n]
    assert second_params and not any(p.requires_grad for p in second_params)
    model.set_adapter("second")
    second = _logits(model)
    assert not torch.allclose(second, first)
    assert all(p.requires_grad for p in second_params)
    model.delete_adapter("second")
    assert "second" not in model.peft_config
    assert not any(".second." in n for n, _ in model.named_parameters())
    model.set_adapter("default")
    assert torch.equal(_logits(model), first)
    with pytest.raises(ValueError, match="Adapter unknown does not exist"):
        model.delete_adapter("unknown")


def test_deleting_the_last_adapter_leaves_a_runnable_base():
    base_logits = _logits(tiny_model())
    model = get_peft_model(tiny_model(), _config())
    model.delete_adapter("default")
    assert torch.equal(_logits(model.base_model), base_logits)


def test_unload_returns_the_untouched_base_model():
    base = tiny_model()
    base_logits = _logits(base)
    base_types = [type(m) for m in base.modules()]
    unloaded = get_peft_model(base, _config()).unload()
    assert [type(m) for m in unloaded.modules()] == base_types
    assert not hasattr(unloaded, "peft_config")
    assert torch.equal(_logits(unloaded), base_logits)


MERGES = {
    "merge_and_unload": lambda m: m.merge_and_unload(),
    "merge_and_unload(safe_merge, adapter_names)": lambda m: m.merge_and_unload(safe_merge=True,
                                                                               adapter_names=["default"]),
    "merge_adapter": lambda m: m.merge_adapter(),
    "base_model.merge_adapter": lambda m: m.base_model.merge_adapter(["default"]),
    "layer.merge": lambda m: next(x for x in m.modules() if isinstance(x, ReftLayer)).merge(),
}


@pytest.mark.parametrize("merge", list(MERGES))
def test_every_merge_raises_one_clear_error_and_changes_nothing(merge):
    model = get_peft_model(tiny_model(), _config(init_weights=False)).eval()
    before = _logits(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^ReFT adapters cannot be merged into the base model: the edit depends on "
                                         r"the token position.*call `unload\(\)` to get the base model back\.$"):
        MERGES[merge](model)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(_logits(model), before) and sum(isinstance(x, ReftLayer) for x in model.modules()) == 2


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    def grads(checkpointing):
        model = get_peft_model(tiny_model(), _config())
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.enable_input_require_grads()
        model.train()
        model(**_batch()).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 12
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_explicit_locations_equal_derived_ones():
    model = get_peft_model(tiny_model(), _config())
    batch = _batch()
    derived = _logits(model, batch)
    # prompt: first 3 tokens of every row (labels -100 there); f2+l2 on a 3-token prompt -> first {0, 1}, last {2}
    locations = torch.tensor([[[0, 1], [2, -1]]] * 3)
    explicit = _logits(model, {**batch, "intervention_locations": locations})
    assert torch.equal(explicit, derived)


def test_inputs_embeds_work_like_input_ids():
    model = get_peft_model(tiny_model(), _config())
    batch = _batch()
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with torch.no_grad():
        from_embeds = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
    torch.testing.assert_close(from_embeds, _logits(model, batch))


def test_rank_larger_than_hidden_size():
    with pytest.raises(ValueError, match=r"low_rank_dimension=33 is larger than the model's hidden size 32"):
        get_peft_model(tiny_model(), _config(low_rank_dimension=33))


def test_layers_all_wraps_every_decoder_layer():
    model = get_peft_model(tiny_model(), _config(layers="all"))
    assert sum(isinstance(m, ReftLayer) for m in model.modules()) == tiny_config().num_hidden_layers


@pytest.mark.parametrize("positions", ["f2+l2", "l3", "all"])
def test_a_packed_row_edits_each_sequence_as_if_it_were_alone(positions):
    """Rows that pack sequences (position_ids restart, no attention mask: TRL's padding-free and packed batches): each
    sequence gets its own windows, so the packed row's logits are those of each sequence run on its own."""
    model = get_peft_model(tiny_model(), _config(positions=positions)).eval()
    lengths, prompts = (7, 5, 9), (4, 2, 6)
    torch.manual_seed(1)
    rows = [torch.randint(3, 90, (1, n)) for n in lengths]
    labels = [ids.masked_fill(torch.arange(n) < p, -100) for ids, n, p in zip(rows, lengths, prompts)]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        # use_cache=False, as in training: transformers reads packed sequences from position_ids only without a cache
        packed = model(input_ids=torch.cat(rows, 1), position_ids=position_ids, labels=torch.cat(labels, 1),
                       use_cache=False).logits
        alone = torch.cat([model(input_ids=ids, labels=lab).logits for ids, lab in zip(rows, labels)], 1)
        with model.disable_adapter():
            plain = model(input_ids=torch.cat(rows, 1), position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(packed, plain)


def test_modules_to_save_are_trained_and_saved(tmp_path):
    model = get_peft_model(tiny_model(), _config(modules_to_save=["model.norm"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("norm.modules_to_save.default" in n for n in trainable)
    with torch.no_grad():
        model.base_model.model.model.norm.modules_to_save["default"].weight.mul_(1.5)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    assert any("norm" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    assert torch.equal(_logits(PeftModel.from_pretrained(tiny_model(), tmp_path)), expected)


def test_training_forward_without_labels_is_an_error():
    model = get_peft_model(tiny_model(), _config())
    model.train()
    ids = _batch()["input_ids"]
    with pytest.raises(ValueError, match=r"\['default'\] edit prompt positions, but this training forward pass has "
                                         r"neither `labels`.*call `model.eval\(\)` first"):
        model(input_ids=ids)
    model(input_ids=ids, labels=ids.masked_fill(torch.arange(ids.shape[1]) < 3, -100))  # labels: fine
    model(input_ids=ids, intervention_locations=torch.zeros(ids.shape[0], 2, 1, dtype=torch.long))  # explicit: fine
    get_peft_model(tiny_model(), _config(positions="all")).train()(input_ids=ids)  # every token: no prompt needed


def test_target_and_exclude_modules_are_chosen_by_layers():
    with pytest.raises(ValueError, match=r"target_modules=\['q_proj'\] was set, but ReFT picks the layers it wraps "
                                         r"from `layers`"):
        get_peft_model(tiny_model(), _config(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"exclude_modules=\['model.layers.1'\] is not supported; choose the layers"):
        get_peft_model(tiny_model(), _config(exclude_modules=["model.layers.1"]))


def test_the_default_config_trains_every_intervention_without_a_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="ReFT: ")
        model = get_peft_model(tiny_model(), ReftConfig())
    batch = _batch()
    model(**batch).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 4 * 3  # one intervention per layer (shared windows): R, W and b
    assert all(grad is not None and grad.abs().sum() > 0 for grad in grads.values()), grads


def test_a_first_window_of_its_own_at_the_last_layer_is_dead_and_says_so():
    with pytest.warns(UserWarning, match=r"positions='f2\+l2' gives the first-window tokens an intervention of their "
                                         r"own at the last layer \(3\).*no gradient.*share_weights=True"):
        model = get_peft_model(tiny_model(), _config(layers="all", positions="f2+l2", share_weights=False))
    ids = _batch()["input_ids"]
    labels = ids.masked_fill(torch.arange(ids.shape[1]) < 4, -100)
    model(input_ids=ids, labels=labels).loss.backward()
    layers = [m for m in model.modules() if isinstance(m, ReftLayer)]
    first_window_grads = [layer.reft_interventions["default"][0].learned_source.weight.grad for layer in layers]
    assert all(g.abs().sum() > 0 for g in first_window_grads[:-1]) and first_window_grads[-1].abs().sum() == 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="ReFT: ")
        get_peft_model(tiny_model(), _config(layers="all", positions="f2+l2", share_weights=True))
        get_peft_model(tiny_model(), _config(layers=[0, 1, 2], positions="f2+l2"))
        get_peft_model(tiny_model(), _config(layers="all", positions="l2"))
