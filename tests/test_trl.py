"""Training with TRL's SFTTrainer: a ReftConfig in place of a LoraConfig, nothing else changed."""

import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from spies import EditedTokens
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from trl import SFTConfig, SFTTrainer

from peft_reft import ReftConfig, ReftDataCollator, ReftLayer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from smollm2 import smollm2_path  # noqa: E402

# ChatML (SmolLM2's format) with the {% generation %} markers TRL needs for assistant_only_loss
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PAIRS = [
    ("What is the capital of France?", " Paris"),
    ("Who wrote Hamlet?", " Shakespeare"),
    ("What color is the sky on a clear day?", " Blue"),
    ("How many legs does a cat have?", " Four"),
]


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    tok.chat_template = CHATML
    return tok


def tiny_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return AutoModelForCausalLM.from_config(config)


def prompt_completion(conversational=False, repeat=4):
    if conversational:
        rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}]}
                for p, c in PAIRS]
    else:
        rows = [{"prompt": p, "completion": c} for p, c in PAIRS]
    return Dataset.from_list(rows * repeat)


def multi_turn(repeat=4):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                          {"role": "user", "content": p}, {"role": "assistant", "content": c}]} for p, c in PAIRS]
    return Dataset.from_list(rows * repeat)


def reft_config(**kwargs):
    return ReftConfig(**{"layers": [0, 2], "low_rank_dimension": 4, "positions": "f2+l2", "share_weights": False,
                         **kwargs})


def sft_args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"), max_steps=24, per_device_train_batch_size=4, learning_rate=2e-2,
        logging_steps=1, use_cpu=True, report_to=[], save_strategy="no", max_length=64, bf16=False, seed=0,
    )
    return SFTConfig(**{**defaults, **kwargs})


def train(tokenizer, tmp_path, dataset=None, config=None, seed=0, **kwargs):
    data_collator = kwargs.pop("data_collator", None)
    eval_dataset = kwargs.pop("eval_dataset", None)
    trainer = SFTTrainer(
        model=tiny_model(tokenizer, seed), args=sft_args(tmp_path, **kwargs),
        train_dataset=dataset if dataset is not None else prompt_completion(), eval_dataset=eval_dataset,
        processing_class=tokenizer, peft_config=config or reft_config(), data_collator=data_collator,
    )
    trainer.train()
    return trainer


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_learns(trainer):
    values = losses(trainer)
    assert len(values) >= 5 and all(torch.isfinite(torch.tensor(values)))
    assert sum(values[-3:]) / 3 < 0.85 * sum(values[:3]) / 3, values


def _generation_record(trainer, tokenizer, prompt_ids):
    model = trainer.model
    spy = EditedTokens(model)
    model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=2, do_sample=False)
    spy.remove()
    return spy.records[0]


@pytest.mark.parametrize("conversational", [False, True])
def test_prompt_completion_trains_and_positions_match_generation(tokenizer, tmp_path, conversational):
    trainer = SFTTrainer(
        model=tiny_model(tokenizer), args=sft_args(tmp_path), train_dataset=prompt_completion(conversational),
        processing_class=tokenizer, peft_config=reft_config(init_weights=False),
    )
    spy = EditedTokens(trainer.model)
    trainer.train()
    spy.remove()
    assert_learns(trainer)
    trained = set(spy.records)
    generated = set()
    for prompt, _ in PAIRS:
        if conversational:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        record = _generation_record(trainer, tokenizer, ids)
        assert len(record[0]) == 2 and len(record[1]) == 2
        assert record[0] == tuple(ids[0, :2].tolist()) and record[1] == tuple(ids[0, -2:].tolist())
        generated.add(record)
    assert trained == generated


def test_multi_turn_assistant_only_loss_uses_the_last_turn_as_prompt(tokenizer, tmp_path):
    trainer = SFTTrainer(
        model=tiny_model(tokenizer), args=sft_args(tmp_path, assistant_only_loss=True, max_length=128),
        train_dataset=multi_turn(), processing_class=tokenizer, peft_config=reft_config(init_weights=False),
    )
    spy = EditedTokens(trainer.model)
    trainer.train()
    spy.remove()
    assert_learns(trainer)
    generated = set()
    for prompt, _ in PAIRS:
        history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        generated.add(_generation_record(trainer, tokenizer, ids))
    assert set(spy.records) == generated


def test_language_modelling_data_trains_with_all_positions(tokenizer, tmp_path):
    data = Dataset.from_list([{"text": p + c} for p, c in PAIRS] * 4)
    assert_learns(train(tokenizer, tmp_path, data, reft_config(positions="all")))


def test_language_modelling_data_with_prompt_positions_fails_before_training(tokenizer, tmp_path):
    data = Dataset.from_list([{"text": p + c} for p, c in PAIRS] * 4)
    with pytest.raises(ValueError, match=r"first attended token already has a label .* use positions='all'"):
        train(tokenizer, tmp_path, data)


def test_reft_data_collator_gives_the_same_training(tokenizer, tmp_path):
    automatic = losses(train(tokenizer, tmp_path / "a"))
    config = reft_config()
    collator = ReftDataCollator(config, pad_token_id=tokenizer.pad_token_id)
    explicit = losses(train(tokenizer, tmp_path / "b", config=config, data_collator=collator))
    torch.testing.assert_close(torch.tensor(explicit), torch.tensor(automatic), rtol=1e-5, atol=1e-5)
    batch = collator([{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, 8, 9]}])
    assert batch["intervention_locations"].tolist() == [[[0, 1], [2, -1]]]


def test_custom_compute_loss_func_needs_the_collator(tokenizer, tmp_path):
    def compute_loss_func(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100)

    with pytest.raises(ValueError, match=r"SFTTrainer with a compute_loss_func computes the loss outside the model "
                                         r"and calls it without labels.*ReftDataCollator"):
        SFTTrainer(model=tiny_model(tokenizer), args=sft_args(tmp_path, max_steps=2), train_dataset=prompt_completion(),
                   processing_class=tokenizer, peft_config=reft_config(), compute_loss_func=compute_loss_func)
    config = reft_config()
    trainer = SFTTrainer(
        model=tiny_model(tokenizer), args=sft_args(tmp_path), train_dataset=prompt_completion(),
        processing_class=tokenizer, peft_config=config, compute_loss_func=compute_loss_func,
        data_collator=ReftDataCollator(config, pad_token_id=tokenizer.pad_token_id),
    )
    trainer.train()
    assert_learns(trainer)


@pytest.mark.parametrize("use_collator", [False, True])
def test_evaluate(tokenizer, tmp_path, use_collator):
    config = reft_config()
    extra = {"data_collator": ReftDataCollator(config, pad_token_id=tokenizer.pad_token_id)} if use_collator else {}
    trainer = train(tokenizer, tmp_path, config=config, eval_dataset=prompt_completion(repeat=1), max_steps=12,
                    prediction_loss_only=False, **extra)
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert metrics["eval_loss"] < losses(trainer)[0]


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("component", ["block_output", "mlp_output", "attention_output"])
def test_gradient_checkpointing(tokenizer, tmp_path, use_reentrant, component):
    trainer = train(tokenizer, tmp_path, config=reft_config(component=component), gradient_checkpointing=True,
                    gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert_learns(trainer)


def test_weight_decay_keeps_rotations_orthonormal(tokenizer, tmp_path):
    trainer = train(tokenizer, tmp_path, weight_decay=0.1)
    assert_learns(trainer)
    interventions = [i for m in trainer.model.modules() if isinstance(m, ReftLayer)
                     for i in m.reft_interventions["default"]]
    assert len(interventions) == 4
    for intervention in interventions:
        rotation = intervention.rotation.detach()
        torch.testing.assert_close(rotation @ rotation.T, torch.eye(4), atol=1e-5, rtol=0)


def test_checkpoints_resume_and_save_model(tokenizer, tmp_path):
    full = train(tokenizer, tmp_path / "full", max_steps=8, save_strategy="steps", save_steps=4)
    checkpoint = tmp_path / "full" / "out" / "checkpoint-4"
    assert (checkpoint / "adapter_model.safetensors").exists() and (checkpoint / "adapter_config.json").exists()
    assert not (checkpoint / "model.safetensors").exists()  # an adapter, not a full model

    trainer = SFTTrainer(model=tiny_model(tokenizer), args=sft_args(tmp_path / "full", max_steps=8),
                         train_dataset=prompt_completion(), processing_class=tokenizer, peft_config=reft_config())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    resumed = losses(trainer)  # the first 4 come from the checkpoint state, the last 4 were trained again
    assert len(resumed) == 8
    torch.testing.assert_close(torch.tensor(resumed[4:]), torch.tensor(losses(full)[4:]), rtol=1e-4, atol=1e-4)

    trainer.save_model(str(tmp_path / "final"))
    batch = tokenizer(["What is the capital of France? Paris"], return_tensors="pt")
    trained = trainer.model.eval()
    loaded = PeftModel.from_pretrained(tiny_model(tokenizer), tmp_path / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, trained(**batch).logits, rtol=0, atol=1e-6)


def test_reft_with_a_lora_part_trains_saves_and_loads(tokenizer, tmp_path):
    config = reft_config(lora_config=LoraConfig(r=4, target_modules="all-linear"))
    trainer = train(tokenizer, tmp_path, config=config)
    assert_learns(trainer)
    model = trainer.model.eval()
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(lora_layers) == 3 * 7 and all(m.lora_B["default"].weight.abs().max() > 0 for m in lora_layers)
    trainer.save_model(str(tmp_path / "final"))
    loaded = PeftModel.from_pretrained(tiny_model(tokenizer), tmp_path / "final").eval()
    batch = tokenizer(["What is the capital of France? Paris"], return_tensors="pt")
    with torch.no_grad():
        trained = model(**batch).logits
        torch.testing.assert_close(loaded(**batch).logits, trained, rtol=0, atol=1e-6)
        with model.disable_adapter():
            assert (model(**batch).logits - trained).abs().max() > 1e-2


def _reft_parameters(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".reft_interventions." in n}


@pytest.mark.parametrize("packing", ["padding_free", "bfd"])
def test_packed_rows_train_as_the_padded_run(tokenizer, tmp_path, packing):
    """padding_free=True (a batch flattened into one row) and packing=True (bfd: whole sequences packed into rows):
    each sequence's prompt windows are edited, so the losses and the trained interventions are the padded run's.
    One batch holds the whole data set in every run, so all runs see the same examples at every step."""
    data = prompt_completion(repeat=2)
    config = reft_config(positions="f2+l2", init_weights=False)
    runs = {}
    for name, options in {"padded": {"per_device_train_batch_size": 8},
                          "packed": ({"padding_free": True, "max_length": None, "per_device_train_batch_size": 8}
                                     if packing == "padding_free" else
                                     {"packing": True, "max_length": 512, "per_device_train_batch_size": 1})}.items():
        trainer = train(tokenizer, tmp_path / name, data, config, max_steps=4, learning_rate=5e-2, **options)
        if name == "packed":
            batch = next(iter(trainer.get_train_dataloader()))
            assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one row ...
            assert int((batch["position_ids"] == 0).sum()) == 8  # ... of the 8 sequences
        runs[name] = (losses(trainer), _reft_parameters(trainer))
    (padded_losses, padded_params), (packed_losses, packed_params) = runs["padded"], runs["packed"]
    assert len(padded_losses) == len(packed_losses) == 4 and padded_losses[-1] < padded_losses[0]
    torch.testing.assert_close(torch.tensor(packed_losses), torch.tensor(padded_losses), rtol=1e-5, atol=1e-5)
    for name, value in padded_params.items():
        torch.testing.assert_close(packed_params[name], value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["wrapped", "bfd_split"])
def test_packing_that_cuts_sequences_is_refused_up_front(tokenizer, tmp_path, strategy):
    with pytest.raises(ValueError, match=rf"SFTTrainer with packing_strategy='{strategy}' cuts sequences to fill its "
                                         r"rows, so a packed sequence can start inside a completion"):
        train(tokenizer, tmp_path, max_steps=2, packing=True, packing_strategy=strategy)


def test_packing_with_all_positions_trains(tokenizer, tmp_path):
    data = Dataset.from_list([{"text": p + c} for p, c in PAIRS] * 4)
    assert_learns(train(tokenizer, tmp_path, data, reft_config(positions="all"), packing=True))


@pytest.mark.slow
@pytest.mark.parametrize("component", ["block_output", "mlp_output", "attention_output"])
def test_torch_compile_trains_as_eager(tokenizer, tmp_path, component):
    """SFTConfig(torch_compile=True) with gradient checkpointing: the compiled run's losses and trained interventions
    are the eager run's (the aot_eager backend: what dynamo and AOT autograd capture, without inductor's code
    generation; tests/test_compile.py runs inductor)."""
    config = reft_config(component=component, init_weights=False)
    runs = {}
    compiled = {"torch_compile": True, "torch_compile_backend": "aot_eager"}
    for name, options in {"eager": {}, "compiled": compiled}.items():
        trainer = train(tokenizer, tmp_path / name, config=config, max_steps=4, gradient_checkpointing=True,
                        gradient_checkpointing_kwargs={"use_reentrant": False}, **options)
        runs[name] = (losses(trainer), _reft_parameters(trainer))
    (eager_losses, eager_params), (compiled_losses, compiled_params) = runs["eager"], runs["compiled"]
    assert len(eager_losses) == 4 and eager_losses[-1] < eager_losses[0]
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-5, atol=1e-5)
    for name, value in eager_params.items():
        torch.testing.assert_close(compiled_params[name], value, rtol=1e-5, atol=1e-5)
