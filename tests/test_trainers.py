"""Every TRL trainer that takes a `peft_config` either trains ReFT on the right tokens or is refused up front.

The edited tokens are found behaviourally (the first ReFT layer's output against its base layer's output, see
`spies.EditedTokens`) and compared with the prompt tokens; a short run checks that every intervention parameter
moves."""

import importlib
import types

import pytest
import torch
from datasets import Dataset
from spies import EditedTokens
from test_trl import PAIRS, tiny_model, tokenizer  # noqa: F401  (tokenizer: fixture)
from transformers import AutoModelForSequenceClassification, LlamaConfig

from peft_reft import ReftConfig, ReftDataCollator
from peft_reft.trainers import deepspeed_problem, trainer_problem

COMMON = dict(max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1, use_cpu=True,
              bf16=False, report_to=[], save_strategy="no", seed=0)
REJECTED = [" I do not know", " Nobody", " Green", " Seven"]


def config(**kwargs):
    # not the last layer: its first-window edit changes only prompt logits, which no loss reads
    return ReftConfig(**{"layers": [0, 1], "low_rank_dimension": 2, "positions": "f1+l1", "share_weights": False,
                         "init_weights": False, **kwargs})


def reft_parameters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".reft_interventions." in n}


def assert_every_parameter_moved(before, model):
    after = reft_parameters(model)
    frozen = [n for n in before if torch.equal(before[n], after[n])]
    assert not frozen, f"intervention parameters that never moved: {frozen}"


def prompt_windows(tokenizer, first=1, last=1):  # noqa: F811
    """The tokens f1+l1 must edit: (first tokens, last tokens) of each prompt."""
    windows = set()
    for prompt, _ in PAIRS:
        ids = tokenizer(prompt)["input_ids"]
        windows.add((tuple(ids[:first]), tuple(ids[-last:])))
    return windows


def run(trainer):
    """Train with a spy on the first ReFT layer; return the edits it saw."""
    before = reft_parameters(trainer.model)
    spy = EditedTokens(trainer.model)
    trainer.train()
    spy.remove()
    assert_every_parameter_moved(before, trainer.model)
    return spy


def test_dpo_edits_the_prompt_and_leaves_the_reference_forward_alone(tokenizer, tmp_path):  # noqa: F811
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for (p, c), r in zip(PAIRS, REJECTED)] * 2)
    trainer = DPOTrainer(model=tiny_model(tokenizer), args=DPOConfig(output_dir=str(tmp_path), **COMMON),
                         train_dataset=data, processing_class=tokenizer, peft_config=config())
    spy = run(trainer)
    assert set(spy.edited()) == prompt_windows(tokenizer)
    assert len(spy.records) > len(spy.edited())  # the reference forward (adapter disabled) edits nothing


def test_kto_edits_the_prompt(tokenizer, tmp_path):  # noqa: F811
    from trl import KTOConfig, KTOTrainer

    rows = [{"prompt": p, "completion": c, "label": True} for p, c in PAIRS]
    rows += [{"prompt": p, "completion": r, "label": False} for (p, _), r in zip(PAIRS, REJECTED)]
    trainer = KTOTrainer(model=tiny_model(tokenizer), args=KTOConfig(output_dir=str(tmp_path), **COMMON),
                         train_dataset=Dataset.from_list(rows * 2), processing_class=tokenizer, peft_config=config())
    assert set(run(trainer).edited()) == prompt_windows(tokenizer)


def _length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.mark.parametrize("name", ["GRPO", "RLOO"])
def test_online_trainers_edit_the_prompt_in_generation_and_in_the_loss(tokenizer, tmp_path, name):  # noqa: F811
    import trl

    args = getattr(trl, f"{name}Config")(output_dir=str(tmp_path), num_generations=2, max_completion_length=4,
                                         **{**COMMON, "per_device_train_batch_size": 4})
    trainer = getattr(trl, f"{name}Trainer")(
        model=tiny_model(tokenizer), reward_funcs=_length_reward, args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p, _ in PAIRS]), processing_class=tokenizer,
        peft_config=config(),
    )
    spy = run(trainer)
    windows = prompt_windows(tokenizer)
    generated = [p for p in spy.passes if p.generation is not None]
    prefills = [p for p in generated if p.step == 0]
    decode_steps = [p for p in generated if p.step > 0]
    assert prefills and decode_steps
    for prefill in prefills:  # every prompt of every generate call is edited at its first and last token
        assert all(record in windows for record in prefill.records), prefill.records
    for step in decode_steps:  # decode steps cost what the base model costs: no edit
        assert not any(any(record) for record in step.records)
    losses = [p for p in spy.passes if p.generation is None]
    assert {record for p in losses for record in p.records if any(record)} == windows


def test_reward_trainer_edits_the_token_the_score_head_reads(tokenizer, tmp_path):  # noqa: F811
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2, num_labels=1, pad_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # pad == eos: the head does not read the trailing eos
    ))
    data = Dataset.from_list([{"chosen": p + c, "rejected": p + r} for (p, c), r in zip(PAIRS, REJECTED)] * 2)
    trainer = RewardTrainer(model=model, args=RewardConfig(output_dir=str(tmp_path), **COMMON), train_dataset=data,
                            processing_class=tokenizer, peft_config=config(task_type="SEQ_CLS", positions="l1"))
    spy = run(trainer)
    assert spy.edited()
    for record, indices in zip(spy.records, spy.indices):
        assert len(record[0]) == 1 and record[0][0] != tokenizer.eos_token_id  # one token, not the trailing eos
    # the edited token is the rightmost non-padding token: the one whose hidden state the score head reads
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ids = batch["chosen_input_ids"] if "chosen_input_ids" in batch else batch["input_ids"]
    read = [int(torch.nonzero(row != tokenizer.pad_token_id).max()) for row in ids]
    group_map = trainer.model.base_model.group_maps({"input_ids": ids, "attention_mask": batch["attention_mask"]
                                                     if "attention_mask" in batch else None})["default"]
    assert [torch.nonzero(row >= 0).flatten().tolist() for row in group_map] == [[r] for r in read]


@pytest.mark.parametrize("name", ["ORPO", "CPO"])
def test_trainers_without_prompt_labels_are_refused_up_front_and_train_with_all_positions(tokenizer, tmp_path,  # noqa: F811
                                                                                          name):
    module = importlib.import_module(f"trl.experimental.{name.lower()}")
    data = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for (p, c), r in zip(PAIRS, REJECTED)] * 2)
    args = getattr(module, f"{name}Config")(output_dir=str(tmp_path), max_length=64, **COMMON)
    trainer_cls = getattr(module, f"{name}Trainer")
    with pytest.raises(ValueError, match=rf"TRL's {name}Trainer calls the model without labels that mark the prompt.*"
                                         r"positions='all'"):
        trainer_cls(model=tiny_model(tokenizer), args=args, train_dataset=data, processing_class=tokenizer,
                    peft_config=config())
    trainer = trainer_cls(model=tiny_model(tokenizer), args=args, train_dataset=data, processing_class=tokenizer,
                          peft_config=config(positions="all"))
    spy = run(trainer)
    assert spy.passes
    for forward in spy.passes:  # "all": exactly the attended tokens of every row
        for row, indices in enumerate(forward.indices):
            mask = forward.attention_mask
            attended = range(len(forward.ids[row])) if mask is None else torch.nonzero(mask[row]).flatten().tolist()
            assert indices[0] == tuple(attended)


def test_distillation_trainer_is_refused_up_front(tokenizer, tmp_path):  # noqa: F811
    from trl.trainer.distillation_config import DistillationConfig
    from trl.trainer.distillation_trainer import DistillationTrainer

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p, _ in PAIRS])
    for positions in ("f1+l1", "all"):
        with pytest.raises(ValueError, match=r"TRL's DistillationTrainer runs the student's transformers backbone "
                                             r"directly"):
            DistillationTrainer(model=tiny_model(tokenizer), teacher_model=tiny_model(tokenizer, seed=1),
                                args=DistillationConfig(output_dir=str(tmp_path), **COMMON), train_dataset=data,
                                processing_class=tokenizer, peft_config=config(positions=positions))


EXPERIMENTAL = ["gkd.GKDTrainer", "online_dpo.OnlineDPOTrainer", "tpo.TPOTrainer", "gold.GOLDTrainer",
                "sdft.SDFTTrainer", "sdpo.SDPOTrainer", "iw_opd.IWOPDTrainer", "async_grpo.AsyncGRPOTrainer",
                "async_distillation.AsyncDistillationTrainer", "server_distillation.ServerDistillationTrainer"]


@pytest.mark.parametrize("path", EXPERIMENTAL)
def test_every_other_trl_trainer_is_refused_with_prompt_positions(path):
    module, name = path.rsplit(".", 1)
    trainer_cls = getattr(importlib.import_module(f"trl.experimental.{module}"), name)
    trainer = trainer_cls.__new__(trainer_cls)  # what the check looks at: the class, not a built trainer
    assert f"TRL's {name} calls the model without labels" in trainer_problem(trainer, prompt_positions=True)
    assert trainer_problem(trainer, prompt_positions=False) is None


@pytest.mark.parametrize("name", ["GRPOTrainer", "RLOOTrainer"])
def test_vllm_generation_is_refused_unless_the_engine_serves_the_policy(name):
    import trl

    trainer_cls = getattr(trl, name)
    trainer = trainer_cls.__new__(trainer_cls)
    trainer.args = types.SimpleNamespace(use_vllm=True)
    assert "use_vllm=True generates with a vLLM engine that peft-reft did not set up" in trainer_problem(trainer, True)
    # TRL's generation as peft_reft.vllm.rl leaves it (every request names the policy's adapter): trains
    trainer.vllm_generation = types.SimpleNamespace(generation_kwargs={"extra_args": {"reft_adapter": "policy"}})
    assert trainer_problem(trainer, True) is None
    trainer.vllm_generation = types.SimpleNamespace(generation_kwargs={})
    assert "did not set up for the ReFT policy" in trainer_problem(trainer, True)
    trainer.args = types.SimpleNamespace(use_vllm=False)
    assert trainer_problem(trainer, True) is None


def test_nvme_offload_without_libaio_is_refused_up_front(tokenizer, tmp_path):  # noqa: F811
    from deepspeed.ops.op_builder import AsyncIOBuilder
    from peft import get_peft_model
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    from trl import SFTConfig, SFTTrainer

    zero = {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)}}
    model = tiny_model(tokenizer)
    args = SFTConfig(output_dir=str(tmp_path), max_length=64, deepspeed={"zero_optimization": zero,
                                                                         "train_micro_batch_size_per_gpu": "auto"},
                     **COMMON)
    try:
        data = Dataset.from_list([{"prompt": p, "completion": c} for p, c in PAIRS])
        if AsyncIOBuilder().is_compatible(verbose=False):  # a machine with libaio: the config is accepted
            assert trainer_problem(types.SimpleNamespace(args=args), True) is None and deepspeed_problem() is None
            return
        refusal = r"offloads to NVMe \(offload_optimizer device 'nvme'\), which needs DeepSpeed's async_io op and " \
                  r"the libaio library"
        with pytest.raises(ValueError, match=refusal):
            SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=config())
        with pytest.raises(ValueError, match=refusal):  # wrapped by hand once the arguments exist: refused as well
            get_peft_model(tiny_model(tokenizer), config())
    finally:
        unset_hf_deepspeed_config()  # the DeepSpeed config of TrainingArguments is process-wide


def _sft_subclasses():
    from trl import SFTTrainer

    class PassesKwargs(SFTTrainer):
        def __init__(self, *positional, **options):
            super().__init__(*positional, **options)

    class WrapsInAHelper(SFTTrainer):
        """Wraps the model itself, in a helper method whose locals have other names (and an `args` of its own)."""

        def __init__(self, model, peft_config, **options):
            super().__init__(model=self._adapted(model, peft_config, options["args"]), **options)

        def _adapted(self, base, reft_config, args):
            from peft import get_peft_model

            return get_peft_model(base, reft_config)

    return {"SFTTrainer": SFTTrainer, "passes **kwargs": PassesKwargs, "wraps in a helper": WrapsInAHelper}


@pytest.mark.parametrize("case", ["SFTTrainer", "passes **kwargs", "wraps in a helper"])
def test_sft_label_smoothing_is_refused_up_front_and_trains_with_the_collator(tokenizer, tmp_path, case):  # noqa: F811
    """Also for subclasses: the check reads the built trainer, not the local variables of the code that built it."""
    from trl import SFTConfig

    trainer_cls = _sft_subclasses()[case]
    data = Dataset.from_list([{"prompt": p, "completion": c} for p, c in PAIRS] * 2)
    args = SFTConfig(output_dir=str(tmp_path), label_smoothing_factor=0.1, max_length=64, **COMMON)
    with pytest.raises(ValueError, match=r"SFTTrainer with label_smoothing_factor=0.1 computes the loss outside the "
                                         r"model .*ReftDataCollator"):
        trainer_cls(model=tiny_model(tokenizer), args=args, train_dataset=data, processing_class=tokenizer,
                    peft_config=config())
    reft_config = config()
    trainer = trainer_cls(model=tiny_model(tokenizer), args=args, train_dataset=data, processing_class=tokenizer,
                          peft_config=reft_config,
                          data_collator=ReftDataCollator(reft_config, pad_token_id=tokenizer.pad_token_id))
    assert set(run(trainer).edited()) == prompt_windows(tokenizer)


def test_a_model_wrapped_before_the_trainer_gets_the_same_refusals(tokenizer, tmp_path):  # noqa: F811
    from peft import get_peft_model
    from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer
    from trl.trainer.distillation_config import DistillationConfig
    from trl.trainer.distillation_trainer import DistillationTrainer

    data = Dataset.from_list([{"prompt": p, "completion": c} for p, c in PAIRS] * 2)
    args = SFTConfig(output_dir=str(tmp_path), label_smoothing_factor=0.1, max_length=64, **COMMON)
    with pytest.raises(ValueError, match=r"SFTTrainer with label_smoothing_factor=0.1 computes the loss outside the "
                                         r"model .*ReftDataCollator"):
        SFTTrainer(model=get_peft_model(tiny_model(tokenizer), config()), args=args, train_dataset=data,
                   processing_class=tokenizer)
    reft_config = config()
    trainer = SFTTrainer(model=get_peft_model(tiny_model(tokenizer), reft_config), args=args, train_dataset=data,
                         processing_class=tokenizer,
                         data_collator=ReftDataCollator(reft_config, pad_token_id=tokenizer.pad_token_id))
    assert set(run(trainer).edited()) == prompt_windows(tokenizer)

    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p, _ in PAIRS])
    with pytest.raises(ValueError, match=r"TRL's DistillationTrainer runs the student's transformers backbone"):
        DistillationTrainer(model=get_peft_model(tiny_model(tokenizer), config()),
                            teacher_model=tiny_model(tokenizer, seed=1),
                            args=DistillationConfig(output_dir=str(tmp_path), **COMMON), train_dataset=prompts,
                            processing_class=tokenizer)

    # GRPO with use_vllm=True cannot be built without vLLM installed: build it without, then let its own method ask
    # again with the option set, as its __init__ does at its end
    grpo = GRPOTrainer(model=get_peft_model(tiny_model(tokenizer), config()), reward_funcs=_length_reward,
                       args=GRPOConfig(output_dir=str(tmp_path), num_generations=2, max_completion_length=4, **COMMON),
                       train_dataset=Dataset.from_list([{"prompt": p} for p, _ in PAIRS]), processing_class=tokenizer)
    grpo.args.use_vllm = True

    def retag(trainer):  # the trainer is this frame's first argument, as in any of its methods
        trainer.model.add_model_tags(trainer._tag_names)

    with pytest.raises(ValueError, match=r"TRL's GRPOTrainer with use_vllm=True generates with a vLLM engine that "
                                         r"peft-reft did not set up"):
        retag(grpo)
