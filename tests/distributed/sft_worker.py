"""Run by tests/test_distributed.py under torchrun: SFTTrainer + ReftConfig on a tiny model, one process per rank.

argv: <output_dir> <per_device_batch> <steps> [bf16]. Writes per rank `params-<rank>.safetensors` and
`losses-<rank>.json`; rank 0 saves the adapter in `<output_dir>/adapter`.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
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


def main():
    out, per_device, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2, pad_token_id=0, eos_token_id=2, bos_token_id=1,
    ))
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {f"t{i}": i for i in range(VOCAB)}, unk_token="t0")), pad_token="t0", eos_token="t2")
    args = SFTConfig(
        output_dir=str(out / "run"), max_steps=steps, per_device_train_batch_size=per_device, learning_rate=5e-2,
        logging_steps=1, use_cpu=True, report_to=[], save_strategy="no", bf16=False, seed=0,
        ddp_find_unused_parameters=False, dataloader_drop_last=True, completion_only_loss=True,
    )
    config = ReftConfig(layers=[0, 2], low_rank_dimension=4, positions="f7+l7")  # f7+l7 > most prompts: empty slots
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset(), processing_class=tokenizer,
                         peft_config=config)
    trainer.train()
    rank = trainer.accelerator.process_index
    params = {n: p.detach().clone().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}
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


if __name__ == "__main__":
    main()
