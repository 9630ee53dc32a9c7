"""`task_type="SEQ_CLS"`: encoders (BERT, RoBERTa) and a decoder with a classification head. Positions are counted
over the attended input (class labels never move them), the logits match the independent reference, the head trains
and saves through `modules_to_save`, and the HF `Trainer` trains the whole thing."""

import pytest
import torch
from conftest import padded_batch, tiny_model
from datasets import Dataset
from peft import PeftModel, get_peft_model
from reference import raw_params, reference_logits
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    LlamaConfig,
    RobertaConfig,
    Trainer,
    TrainingArguments,
    XLNetConfig,
    XLNetForSequenceClassification,
)

from peft_reft import ReftConfig, ReftDataCollator

ENCODER = {"vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
           "intermediate_size": 64, "pad_token_id": 0, "num_labels": 3, "initializer_range": 0.2,
           "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # dropout swamps a model this small
CONFIGS = {
    "bert": lambda: BertConfig(**ENCODER),
    "roberta": lambda: RobertaConfig(**ENCODER, max_position_embeddings=64),
    "llama": lambda: LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, num_labels=3,
                                 initializer_range=0.2),
}
HEAD = {"bert": "classifier", "roberta": "classifier", "llama": "score"}


def _model(arch, seed=0):
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(CONFIGS[arch]()).eval()


def _config(**kwargs):
    defaults = {"task_type": "SEQ_CLS", "layers": [0, 2], "low_rank_dimension": 3, "positions": "f2+l2",
                "share_weights": False, "init_weights": False}
    return ReftConfig(**{**defaults, **kwargs})


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_reference_and_class_labels_do_not_move_positions(arch, side):
    model = get_peft_model(_model(arch), _config()).eval()
    ids, mask = padded_batch([7, 3, 5], side=side, seed=4)
    labels = torch.tensor([2, 0, 1])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        unlabelled = model(input_ids=ids, attention_mask=mask).logits
    expected = reference_logits(_model(arch), raw_params(model), "loreft", ids, mask, None, 2, 2, False)
    torch.testing.assert_close(out.logits, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(unlabelled, out.logits)
    assert torch.isclose(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    with torch.no_grad():
        plain = _model(arch)(input_ids=ids, attention_mask=mask).logits
    assert (out.logits - plain).abs().max() > 1e-3


def test_roberta_prefix_only_positions():
    # the paper's GLUE setting for RoBERTa edits a prefix only; the head reads <s>, the first token
    model = get_peft_model(_model("roberta"), _config(positions="f1", layers=[1, 2])).eval()
    ids, mask = padded_batch([6, 4], side="right", seed=2)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    expected = reference_logits(_model("roberta"), raw_params(model), "loreft", ids, mask, None, 1, 0, False)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_head_is_trainable_and_round_trips(arch, tmp_path):
    model = get_peft_model(_model(arch), _config())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any(f"{HEAD[arch]}.modules_to_save.default." in name for name in trainable), trainable
    assert all("reft_interventions" in name or f"{HEAD[arch]}." in name for name in trainable), trainable
    with torch.no_grad():  # make the saved head differ from the freshly initialised one
        for name, p in model.named_parameters():
            if f"{HEAD[arch]}.modules_to_save" in name:
                p.add_(0.5)
    model.eval()
    ids, mask = padded_batch([5, 3], side="right", seed=7)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_model(arch), tmp_path).eval()
    assert loaded.peft_config["default"].task_type == "SEQ_CLS"
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected)


def pad_collate(features):
    """Right-pads input_ids with 0 (tiny model, no tokenizer) and stacks the class labels."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features])
    return {"input_ids": ids, "attention_mask": (ids != 0).long(),
            "labels": torch.tensor([f["labels"] for f in features])}


def _token_task(n, seed):
    """Label = which of the marker tokens 5, 6, 7 appears among the first three tokens (the rest is noise)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, 10, (1,), generator=g))
        ids = torch.randint(10, 97, (length,), generator=g)
        label = int(torch.randint(0, 3, (1,), generator=g))
        ids[int(torch.randint(0, 3, (1,), generator=g))] = 5 + label
        rows.append({"input_ids": ids.tolist(), "labels": label})
    return Dataset.from_list(rows)


def test_hf_trainer_trains_the_interventions_and_the_head(tmp_path):
    base = _model("bert")
    frozen = {name: p.detach().clone() for name, p in base.named_parameters()}
    model = get_peft_model(base, _config(layers="all", low_rank_dimension=4, positions="f3+l3"))
    head_before = model.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=80, per_device_train_batch_size=16,
                             learning_rate=2e-2, logging_steps=5, use_cpu=True, report_to=[], save_strategy="no",
                             seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=_token_task(640, 0), data_collator=pad_collate)
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.5 * losses[0], losses
    test = pad_collate(list(_token_task(200, 1)))
    model.eval()
    with torch.no_grad():
        accuracy = (model(**test).logits.argmax(-1) == test["labels"]).float().mean().item()
    assert accuracy > 0.8, accuracy
    head = model.base_model.model.classifier
    assert not torch.equal(head.modules_to_save["default"].weight, head_before)
    for name, p in model.base_model.model.named_parameters():  # the base model stayed frozen
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_time_major_architecture_is_refused_by_name():
    # XLNet's layers run on [seq_len, batch, hidden]: with seq_len == batch size no shape check could notice
    model = XLNetForSequenceClassification(XLNetConfig(vocab_size=97, d_model=32, n_layer=2, n_head=4, d_inner=64))
    with pytest.raises(ValueError, match=r"XLNetForSequenceClassification \(xlnet\) is not supported: its layers run "
                                         r"on hidden states laid out \[seq_len, batch, hidden\]"):
        get_peft_model(model, _config(layers=[0, 1]))


def test_a_head_named_in_modules_to_save_is_trained():
    model = _model("bert")
    model.head = model.classifier  # a head under another name (as in some architectures)
    del model.classifier
    with pytest.raises(ValueError, match=r"or a head named in `modules_to_save`\); BertForSequenceClassification"):
        get_peft_model(model, _config())
    model = get_peft_model(model, _config(modules_to_save=["head"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any(".head.modules_to_save.default." in name for name in trainable), trainable


def test_task_type_must_fit_the_model():
    with pytest.raises(ValueError, match=r"needs a model with a classification head \(a `classifier` or `score` "
                                         r"module, e.g. from AutoModelForSequenceClassification, or a head named in "
                                         r"`modules_to_save`\); LlamaForCausalLM has none"):
        get_peft_model(tiny_model(), _config())
    with pytest.raises(ValueError, match=r"task_type='CAUSAL_LM'\) needs a model that generates text, and "
                                         r"BertForSequenceClassification does not.*use task_type='SEQ_CLS'"):
        get_peft_model(_model("bert"), _config(task_type="CAUSAL_LM"))


def test_class_labels_with_a_causal_lm_config_are_refused():
    model = get_peft_model(tiny_model(), _config(task_type="CAUSAL_LM"))
    ids, mask = padded_batch([4, 4], seed=1)
    with pytest.raises(ValueError, match=r"labels of shape \[2\] are not token labels of shape \[2, 4\].*"
                                         r"task_type='SEQ_CLS'"):
        model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1]))


def test_collator_places_positions_on_the_whole_input():
    config = _config(positions="f1+l2")
    model = get_peft_model(_model("bert"), config).eval()
    batch = ReftDataCollator(config, collator=pad_collate)(list(_token_task(4, 3)))
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert batch["intervention_locations"].tolist() == [[[0, -1], [n - 2, n - 1]] for n in lengths]
    with torch.no_grad():
        explicit = model(**batch).logits
        derived = model(**{k: v for k, v in batch.items() if k != "intervention_locations"}).logits
    torch.testing.assert_close(explicit, derived)


@pytest.mark.parametrize("side", ["left", "right"])
def test_decoder_classifier_last_window_ends_at_the_token_the_head_reads(side):
    """pad == eos: each row ends with an eos that transformers' head does not read (it reads the rightmost token that
    is not padding). An `l1` edit must land on the token read, so it changes the scores."""
    config = CONFIGS["llama"]()
    config.eos_token_id = config.pad_token_id = 2
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(config).eval()
    ids, mask = padded_batch([6, 4], side=side, seed=3)
    ids = torch.where(mask.bool(), ids, 2)
    eos_at = mask.sum(1) - 1 if side == "right" else torch.full((2,), ids.shape[1] - 1)
    ids[torch.arange(2), eos_at] = 2  # the last attended token of each row is an eos, as TRL's reward data has it
    read = [int(torch.nonzero(row != 2).max()) for row in ids]
    model = get_peft_model(base, _config(layers=[1], positions="l1"))
    with torch.no_grad():
        for module in model.modules():  # a clearly non-zero edit
            if hasattr(module, "learned_source") and isinstance(module.learned_source, torch.nn.Linear):
                module.learned_source.bias.fill_(3.0)
    group_map = model.base_model.group_maps({"input_ids": ids, "attention_mask": mask})["default"]
    assert [torch.nonzero(row >= 0).flatten().tolist() for row in group_map] == [[r] for r in read]
    collated = ReftDataCollator(model.peft_config["default"], collator=lambda rows: rows[0], head_pad_token_id=2)(
        [{"input_ids": ids, "attention_mask": mask}])  # the collator places the window where the model does
    assert collated["intervention_locations"].tolist() == [[r] for r in read]
    with torch.no_grad():
        scores = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            plain = model(input_ids=ids, attention_mask=mask).logits
    assert (scores - plain).abs().min() > 1e-3
