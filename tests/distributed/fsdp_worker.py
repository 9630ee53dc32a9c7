"""Run by tests/test_distributed.py under torchrun: a ReFT PeftModel sharded with torch FSDP2 (`fully_shard`) over
gloo, the way accelerate/transformers wrap decoder layers (each inner decoder layer, then the root). Writes the full
intervention parameters after a few AdamW steps to `<output_dir>/rank-<rank>.safetensors`; with `single` as second
argument it runs the same steps in one process on the whole batch instead."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from peft_reft import ReftConfig


def main():
    out, mode = Path(sys.argv[1]), sys.argv[2]
    distributed = mode == "fsdp"
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2,
    ))
    model = get_peft_model(base, ReftConfig(layers=[0, 2], low_rank_dimension=4, share_weights=False,
                                            positions="f2+l2", init_weights=False))
    if distributed:
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if isinstance(module, LlamaDecoderLayer):
                fully_shard(module)
        fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        ids = torch.randint(3, 97, (4, 8), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100
        shard = slice(rank * 4 // world, (rank + 1) * 4 // world)
        loss = model(input_ids=ids[shard], attention_mask=torch.ones_like(ids[shard]), labels=labels[shard]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    params = {}
    for name, param in model.named_parameters():
        if ".reft_interventions." in name:
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            params[name] = full.detach().clone().contiguous()
    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
    save_file(params, str(out / f"{mode}-{rank}.safetensors"), metadata={"sharded": str(sharded)})
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
