"""Run by tests/test_distributed.py under torchrun (or alone): SFTTrainer + ReftConfig on a tiny model.

argv: <output_dir> <per_device_batch> <steps> [deepspeed options]. Writes per rank `params-<rank>.safetensors` (whole
tensors, gathered under ZeRO-3) and `losses-<rank>.json`; the main process saves the adapter in `<output_dir>/adapter`.
DeepSpeed options (TrainingArguments(deepspeed=...), as a user of the HF Trainer sets it): `zero2` or `zero3`, plus
`init` (ZeRO-3 partitions the base model's weights from construction, zero3_init_flag), `gc` (gradient
checkpointing), `offload` (ZeRO-3 parameter offload to the CPU), `base=<dir>` (load the base model saved there);
`lora` (with or without DeepSpeed) gives the ReFT adapter a LoRA part on q_proj and v_proj; `gc` also without
DeepSpeed; `intervention=<name>` and `component=<name>` choose the adapter (default LoReFT on `block_output`). ZeRO-3
partitions every parameter (persistence threshold 0: the tiny model's tensors are all below DeepSpeed's default), the
interventions included, which the worker checks after training.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig
from trl import SFTConfig, SFTTrainer

from peft_reft import ReftConfig

VOCAB = 97


def dataset():
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(32):
        prompt = torch.randint(3, VOCAB, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        completion = [10 + len(prompt) % 3, 5, 6, 7]  # easy to learn: a fixed reply, its first token set by the length
        rows.append({"prompt": prompt, "completion": completion})
    # pre-tokenized rows: TRL builds the labels from completion_mask (-100 on the prompt)
    return Dataset.from_list([
        {"input_ids": r["prompt"] + r["completion"], "completion_mask": [0] * len(r["prompt"]) + [1] * 4}
        for r in rows
    ])


def tiny_model(path=None):
    """The tiny Llama, built from its config (seed 0), or loaded from `path` (a saved copy of it)."""
    if path is not None:
        return AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2, pad_token_id=0, eos_token_id=2, bos_token_id=1,
    ))


def deepspeed_config(options):
    """A DeepSpeed config as HF Trainer users write one ("auto" values are filled in from TrainingArguments)."""
    stage = 3 if "zero3" in options else 2
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition every tensor, however small
    if "offload" in options:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        # torch's AdamW: DeepSpeed's CPU Adam would be compiled first
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto", "torch_adam": True}},
    }


def main():
    out, per_device, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    options = {o for o in sys.argv[4:] if "=" not in o}
    settings = dict(o.split("=", 1) for o in sys.argv[4:] if "=" in o)
    base = settings.get("base")  # a saved base model to load
    deepspeed = deepspeed_config(options) if options & {"zero2", "zero3"} else None
    model = None if "init" in options else tiny_model(base)  # built after the ZeRO-3 config: partitioned from the start
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {f"t{i}": i for i in range(VOCAB)}, unk_token="t0")), pad_token="t0", eos_token="t2")
    args = SFTConfig(
        output_dir=str(out / "run"), max_steps=steps, per_device_train_batch_size=per_device, learning_rate=5e-2,
        logging_steps=1, use_cpu=True, report_to=[], save_strategy="no", bf16=False, seed=0,
        ddp_find_unused_parameters=False, dataloader_drop_last=True, completion_only_loss=True,
        deepspeed=deepspeed, gradient_checkpointing="gc" in options,
    )
    if model is None:
        import deepspeed

        deepspeed.init_distributed()  # zero.Init reads the world size from DeepSpeed's process group
        model = tiny_model(base)
        partitioned = model.model.layers[0].self_attn.q_proj.weight
        assert partitioned.numel() == 0 and partitioned.ds_numel == 32 * 32  # ZeRO-3 partitioned it at construction
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"]) if "lora" in options else None  # ReFT + LoRA
    # f7+l7 is longer than most prompts: empty slots
    config = ReftConfig(layers=[0, 2], low_rank_dimension=4, share_weights=False, positions="f7+l7",
                        lora_config=lora,
                        intervention=settings.get("intervention", "loreft"),
                        component=settings.get("component", "block_output"))
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset(), processing_class=tokenizer,
                         peft_config=config)
    trainer.train()
    rank = trainer.accelerator.process_index
    trained = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    if "zero3" in options:  # partitioned for real: each rank holds a shard of every intervention tensor
        assert all(p.numel() < p.ds_numel for n, p in trained if ".reft_interventions." in n)
    with gathered([p for _, p in trained]):
        params = {n: p.detach().clone().contiguous() for n, p in trained}
    save_file(params, str(out / f"params-{rank}.safetensors"))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    (out / f"losses-{rank}.json").write_text(json.dumps(losses))
    (out / f"writes-{rank}.json").write_text(json.dumps(trainer.args.should_save))  # who writes checkpoints/adapters
    trainer.save_model(str(out / "adapter"))  # the Trainer writes on the main process only
    accelerator = trainer.accelerator
    del trainer, model
    accelerator.free_memory()  # free the DDP reducer while its gloo group still exists
    accelerator.end_training()  # destroys the process group: no gloo abort at exit
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gathered(params):
    """The whole tensors of ZeRO-3 partitioned parameters (nothing to do without ZeRO-3)."""
    from contextlib import nullcontext

    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


if __name__ == "__main__":
    main()
