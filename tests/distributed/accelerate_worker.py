"""Run by tests/test_distributed.py under torchrun: a plain accelerate loop with a ReFT PeftModel.

Each rank builds its adapter from a different seed (DDP must broadcast rank 0's), trains on batches whose prompts
are shorter than the positions ask for (empty slots: parameters must still get gradients, or DDP would hang), and
writes its parameters and per-step gradient checksums to `<output_dir>/rank-<rank>.pt`.
"""

import sys
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from peft import get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from peft_reft import ReftConfig


def main():
    out = Path(sys.argv[1])
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=60))])
    rank = accelerator.process_index
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2,
    ))
    torch.manual_seed(100 + rank)  # a different adapter init on each rank
    model = get_peft_model(base, ReftConfig(layers=[0, 2], low_rank_dimension=4, share_weights=False,
                                            positions="f3+l3", init_weights=False))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(rank)
    grads = []
    for step in range(6):
        ids = torch.randint(3, 97, (2, 6), generator=g)
        labels = ids.clone()
        labels[:, :2] = -100  # 2-token prompts, shorter than f3+l3: some slots stay empty
        if rank == 1 and step % 2:
            labels[:, :] = -100  # no supervised token on this rank: all tokens are prompt
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        accelerator.backward(loss)
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        optimizer.step()
        optimizer.zero_grad()
    final = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"initial": initial, "grads": grads, "final": final}, out / f"rank-{rank}.pt")
    accelerator.wait_for_everyone()
    del model, optimizer
    accelerator.free_memory()  # free the DDP reducer while its gloo group still exists (else exit can deadlock)
    accelerator.end_training()


if __name__ == "__main__":
    main()
