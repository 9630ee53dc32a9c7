"""`ReftDataCollator`: adds explicit `intervention_locations` to every batch of another collator."""

from __future__ import annotations

from typing import Any, Callable, Optional

from .config import ReftConfig
from .positions import INTERVENTION_LOCATIONS, adapter_group_map, locations_from_group_map


class ReftDataCollator:
    """Wraps a data collator and adds `intervention_locations` (see `peft_reft.positions`) to each batch.

    The model derives positions from `labels` by itself, so plain training does not need this collator. Use it where
    the model is called without labels, e.g. a custom `compute_loss_func`, or to inspect positions. The locations are
    computed on the host, from the collated `attention_mask` and `labels`, with the rule the model uses.

    Args:
        reft_config (`ReftConfig`): the adapter's config (its `positions` and `share_weights` decide the locations).
        collator (callable, *optional*): the collator to wrap. Default: TRL's `DataCollatorForLanguageModeling`
            (right padding), which needs `pad_token_id`.
        pad_token_id (`int`, *optional*): the padding token id for the default collator.
        head_pad_token_id (`int`, *optional*): with `task_type="SEQ_CLS"` on a decoder classifier (a `score` head, e.g.
            LlamaForSequenceClassification), the model's `pad_token_id`: the head reads the rightmost token that is
            not padding, and the windows end there, as in the model.

    Example:

        ```py
        >>> collator = ReftDataCollator(reft_config, pad_token_id=tokenizer.pad_token_id)
        >>> trainer = SFTTrainer(model, args=args, train_dataset=ds, processing_class=tokenizer,
        ...                      peft_config=reft_config, data_collator=collator)
        ```
    """

    def __init__(
        self,
        reft_config: ReftConfig,
        collator: Optional[Callable[[list[dict[str, Any]]], dict[str, Any]]] = None,
        pad_token_id: Optional[int] = None,
        head_pad_token_id: Optional[int] = None,
    ):
        if collator is None:
            if pad_token_id is None:
                raise ValueError(
                    "ReftDataCollator: pass `pad_token_id` (e.g. tokenizer.pad_token_id) for the default TRL collator, "
                    "or pass your own `collator`."
                )
            from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

            collator = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)
        self.reft_config = reft_config
        self.collator = collator
        self.head_pad_token_id = head_pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        config = self.reft_config
        group_map = adapter_group_map(config, batch, self.head_pad_token_id)
        locations = locations_from_group_map(group_map, config.num_groups)
        batch[INTERVENTION_LOCATIONS] = locations[:, 0] if config.num_groups == 1 else locations
        return batch
