"""The serving rule (`peft_reft.vllm.plan`, `peft_reft.vllm.prefix_cache`): per engine step, which tokens each adapter
edits, whatever the chunking; checked against a hand-written window rule and against the batch rule of `generate`.
No vLLM needed."""

import dataclasses
import random

import numpy as np
import pytest
import torch

from peft_reft import ReftConfig
from peft_reft.positions import adapter_group_map
from peft_reft.vllm.adapters import ServedAdapter
from peft_reft.vllm.plan import step_edits
from peft_reft.vllm.prefix_cache import block_extra_key


def served(name, **config):
    return ServedAdapter(name=name, path=f"/adapters/{name}", config=ReftConfig(**config))


def expected_groups(n: int, first: int, last: int, untied: bool) -> dict[int, int]:
    """Hand-written: token -> group for a prompt of n tokens (windows never overlap; a short prompt is split)."""
    take_first = min(first, max((n + 1) // 2, n - last))
    take_last = min(last, n - take_first)
    groups = {t: 0 for t in range(take_first)}
    groups.update({t: 1 if untied else 0 for t in range(n - take_last, n)})
    return groups


ADAPTERS = {
    "f2l3": served("f2l3", positions="f2+l3", share_weights=False),
    "l4": served("l4", positions="l4"),
    "f5l5": served("f5l5", positions="f5+l5"),
    "all": served("all", positions="all"),
}


def simulate(prompt_lengths, adapters_of, new_tokens, budget, seed):
    """Run requests through engine-like steps (chunked prefill within a token budget, then decode steps) and collect
    per request {absolute position: group} from `step_edits`."""
    rng = random.Random(seed)
    done = [0] * len(prompt_lengths)
    total = [n + new_tokens for n in prompt_lengths]
    seen = [dict() for _ in prompt_lengths]
    while any(d < t for d, t in zip(done, total)):
        rows = [i for i in range(len(prompt_lengths)) if done[i] < total[i]]
        rng.shuffle(rows)  # the runner reorders rows between steps
        counts, left = [], budget
        for i in rows:
            want = max(1, prompt_lengths[i] - done[i]) if done[i] < prompt_lengths[i] else 1
            take = max(0, min(want, left, rng.randint(1, budget)))
            counts.append(take)
            left -= take
        keep = [k for k, c in enumerate(counts) if c]
        rows, counts = [rows[k] for k in keep], [counts[k] for k in keep]
        starts = np.concatenate([[0], np.cumsum(counts)])
        edits = step_edits(ADAPTERS, [adapters_of[i] for i in rows], starts, np.array([done[i] for i in rows]),
                           np.array([prompt_lengths[i] for i in rows]))
        for name, locations in edits.items():
            assert locations.shape[0] == 1 and locations.shape[1] == ADAPTERS[name].num_groups  # one row: the step
            for group, index in enumerate(locations[0]):
                for token in index[index >= 0].tolist():
                    k = int(np.searchsorted(starts, token, side="right") - 1)
                    row = rows[k]
                    assert adapters_of[row] == name
                    seen[row][done[row] + token - starts[k]] = group
        for i, c in zip(rows, counts):
            done[i] += c
    return seen


@pytest.mark.parametrize("seed", range(6))
def test_every_chunking_edits_the_tokens_of_one_pass(seed):
    rng = random.Random(100 + seed)
    names = [None, *ADAPTERS]
    prompt_lengths = [rng.randint(1, 30) for _ in range(10)]
    adapters_of = [names[i % len(names)] for i in range(10)]
    seen = simulate(prompt_lengths, adapters_of, new_tokens=4, budget=rng.choice([3, 8, 64]), seed=seed)
    for n, name, got in zip(prompt_lengths, adapters_of, seen):
        if name is None:
            assert got == {}
        elif name == "all":
            assert got == {t: 0 for t in range(n + 4)}  # every computed token, prompt and generated
        else:
            spec = ADAPTERS[name].spec
            assert got == expected_groups(n, spec.first, spec.last, ADAPTERS[name].num_groups == 2), (name, n)


@pytest.mark.parametrize("name", ["f2l3", "l4", "f5l5", "all"])
def test_serving_rule_is_the_batch_rule_of_generate(name):
    """The prefill of `generate` (left-padded prompts, attention mask, no labels) edits what a server edits."""
    adapter = ADAPTERS[name]
    lengths = [1, 2, 5, 9, 17]
    width = max(lengths)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    group_map = adapter_group_map(adapter.config, {"input_ids": torch.zeros_like(mask), "attention_mask": mask})
    served_rule = step_edits({name: adapter}, [name] * len(lengths), np.concatenate([[0], np.cumsum(lengths)]),
                             np.zeros(len(lengths)), np.array(lengths))
    flat = torch.full((sum(lengths),), -1)
    for group, index in enumerate(served_rule[name][0]):
        flat[index[index >= 0]] = group
    assert flat.tolist() == group_map[mask.bool()].tolist()


def test_decode_steps_of_prompt_adapters_plan_nothing():
    edits = step_edits(ADAPTERS, ["f2l3", "l4", None], np.array([0, 1, 2, 3]), np.array([9, 4, 7]),
                       np.array([9, 4, 3]))
    assert edits == {}
    edits = step_edits(ADAPTERS, ["all", "l4"], np.array([0, 1, 2]), np.array([9, 4]), np.array([9, 4]))
    assert list(edits) == ["all"] and edits["all"].tolist() == [[[0]]]


def test_prefix_cache_key_marks_exactly_the_blocks_with_edits():
    l4, f2l3, everything = ADAPTERS["l4"], ADAPTERS["f2l3"], ADAPTERS["all"]
    # a 100-token prompt, blocks of 32: the last-4 window (96..99) lies in block 3 only
    assert [block_extra_key(l4, 100, s, s + 32) for s in (0, 32, 64)] == [None, None, None]
    assert block_extra_key(l4, 100, 96, 128) == ("reft", "l4", (0, 0, 0, 0) + (-1,) * 28)
    # the same tokens under a prompt of another length are edited elsewhere: another key
    assert block_extra_key(l4, 99, 64, 96)[2][-2:] == (-1, 0)  # token 95 is in the window of a 99-token prompt
    assert block_extra_key(f2l3, 100, 0, 32)[2][:3] == (0, 0, -1)
    assert block_extra_key(f2l3, 100, 32, 64) is None
    assert block_extra_key(f2l3, 100, 96, 128)[2][:4] == (-1, 1, 1, 1)
    assert block_extra_key(f2l3, 100, 128, 160) is None  # generated tokens of a prompt adapter: not edited
    assert block_extra_key(everything, 100, 128, 160) == ("reft", "all", "all")
    # the adapter's name loaded again (at run time) is another load: its blocks are keyed apart from the first one's
    reloaded = dataclasses.replace(l4, uid="l4@2")
    assert block_extra_key(reloaded, 100, 96, 128) == ("reft", "l4@2", (0, 0, 0, 0) + (-1,) * 28)
