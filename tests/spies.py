"""Test helpers that observe what a ReFT adapter does, from the outside."""

import torch

from peft_reft import ReftLayer


class EditedTokens:
    """Finds, per example and forward pass, the token ids each intervention of the first ReFT layer edits, from the
    layer's behaviour: where its output differs from its base layer's output, and which intervention's delta makes
    the difference. Needs a non-identity adapter (init_weights=False, or trained)."""

    def __init__(self, peft_model, adapter="default"):
        self.records, self.indices, self._ids, self._base = [], [], None, None
        layer = next(m for m in peft_model.modules() if isinstance(m, ReftLayer))
        self._interventions = layer.reft_interventions[adapter]
        self._handles = [
            peft_model.get_input_embeddings().register_forward_hook(lambda m, a, o: setattr(self, "_ids", a[0])),
            # a copy: the edit is added to the base layer's output in place
            layer.base_layer.register_forward_hook(lambda m, a, o: setattr(self, "_base", _hidden(o).detach().clone())),
            layer.register_forward_hook(lambda m, a, o: self._record(_hidden(o))),
        ]

    @torch.no_grad()
    def _record(self, edited):
        for row in range(edited.shape[0]):
            base, difference = self._base[row], (edited[row] - self._base[row]).float()
            changed = difference.abs().amax(dim=-1) > 0
            per_group = []
            for intervention in self._interventions:
                delta = intervention(base).float()
                explains = (difference - delta).abs().amax(dim=-1) <= 1e-4 * (1 + base.abs().amax(dim=-1).float())
                per_group.append(changed & explains)
            assert not (changed & ~torch.stack(per_group).any(0)).any(), "an edit that no intervention explains"
            self.records.append(tuple(tuple(self._ids[row][mask].tolist()) for mask in per_group))
            self.indices.append(tuple(tuple(torch.nonzero(mask).flatten().tolist()) for mask in per_group))

    def edited(self):
        """The records of forward passes that edited something (a reference forward with the adapter disabled edits
        nothing)."""
        return [record for record in self.records if any(record)]

    def remove(self):
        for handle in self._handles:
            handle.remove()


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output
