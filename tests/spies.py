"""Test helpers that observe what a ReFT adapter does, from the outside."""

from dataclasses import dataclass
from typing import Optional

import torch

from peft_reft import ReftLayer


@dataclass
class Pass:
    """One forward pass of the transformers model: per row, the token ids and the token indices each intervention
    edited; which `generate` call it belongs to (None: a plain forward) and its step there (0 = prefill)."""

    ids: list
    records: list
    indices: list
    attention_mask: Optional[torch.Tensor]
    generation: Optional[int]
    step: int


class EditedTokens:
    """Finds, per example and forward pass, the token ids each intervention of the first ReFT layer edits, from the
    layer's behaviour: where its output differs from its base layer's output, and which intervention's delta makes
    the difference. Needs a non-identity adapter (init_weights=False, or trained).

    `records` / `indices` hold one entry per row of every forward pass; `passes` holds every forward pass, edited or
    not, with the `generate` call and step it belongs to (found by wrapping the PeftModel's `generate`)."""

    def __init__(self, peft_model, adapter="default"):
        self.records, self.indices, self.passes = [], [], []
        self._ids = self._base = self._mask = None
        self._generation, self._generations, self._step = None, 0, 0
        layer = next(m for m in peft_model.modules() if isinstance(m, ReftLayer))
        self._interventions = layer.reft_interventions[adapter]
        self._model = peft_model
        self._generate = peft_model.generate
        peft_model.generate = self._wrapped_generate
        self._handles = [
            peft_model.get_base_model().register_forward_pre_hook(self._enter, with_kwargs=True),
            peft_model.get_input_embeddings().register_forward_hook(lambda m, a, o: setattr(self, "_ids", a[0])),
            # a copy: the edit is added to the base layer's output in place
            layer.base_layer.register_forward_hook(lambda m, a, o: setattr(self, "_base", _hidden(o).detach().clone())),
            layer.register_forward_hook(lambda m, a, o: self._record(_hidden(o))),
        ]

    def _wrapped_generate(self, *args, **kwargs):
        self._generations += 1
        self._generation, self._step = self._generations, 0
        try:
            return self._generate(*args, **kwargs)
        finally:
            self._generation = None

    def _enter(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._mask = mask.detach().clone() if isinstance(mask, torch.Tensor) else None

    @torch.no_grad()
    def _record(self, edited):
        records, indices = [], []
        for row in range(edited.shape[0]):
            base, difference = self._base[row], (edited[row] - self._base[row]).float()
            changed = difference.abs().amax(dim=-1) > 0
            per_group = []
            for intervention in self._interventions:
                delta = intervention(base).float()
                explains = (difference - delta).abs().amax(dim=-1) <= 1e-4 * (1 + base.abs().amax(dim=-1).float())
                per_group.append(changed & explains)
            assert not (changed & ~torch.stack(per_group).any(0)).any(), "an edit that no intervention explains"
            records.append(tuple(tuple(self._ids[row][mask].tolist()) for mask in per_group))
            indices.append(tuple(tuple(torch.nonzero(mask).flatten().tolist()) for mask in per_group))
        self.records += records
        self.indices += indices
        self.passes.append(Pass([row.tolist() for row in self._ids], records, indices, self._mask, self._generation,
                                self._step))
        if self._generation is not None:
            self._step += 1

    def edited(self):
        """The records of forward passes that edited something (a reference forward with the adapter disabled edits
        nothing)."""
        return [record for record in self.records if any(record)]

    def remove(self):
        for handle in self._handles:
            handle.remove()
        del self._model.generate  # the class's generate again


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output
