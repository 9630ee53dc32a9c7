"""torch.compile: a ReFT model traces to one graph (no graph break) in eval and in training, for every component and
with gradient checkpointing; compiled training (`fullgraph=True`, both checkpoint flavours) gives eager's loss and
gradients, and the loss of the independent reference; compiled generation (static cache) gives eager's tokens.

Most cases use the `aot_eager` backend: it runs what dynamo and AOT autograd capture (the graph, the recomputation
of checkpointed layers) without inductor's code generation, which takes a minute per model on CPU. One case runs
inductor, the default backend."""

import pytest
import torch
from conftest import padded_batch, tiny_model
from peft import PeftModel, get_peft_model
from reference import raw_params, reference_logits
from torch._dynamo.utils import counters
from transformers import CompileConfig

from peft_reft import ReftConfig

COMPONENTS = ["block_output", "mlp_output", "attention_output"]
SUBMODULE = {"block_output": None, "mlp_output": "mlp", "attention_output": "self_attn"}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    # transformers 5.25 routes its kernel functions through a context variable that every attention layer sets
    # (`kernels.use_kernelized_func`): inside a checkpointed layer dynamo breaks the graph there, for any model (the
    # base model's and LoRA's too), unless it may skip replaying that side effect in the recomputation (README)
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        yield
    torch._dynamo.reset()


def _model(component, checkpointing=None, **kwargs):
    """A tiny Llama with a trained-looking LoReFT adapter on its first two layers, in training mode."""
    base = tiny_model(layers=3)
    if checkpointing:
        reentrant = checkpointing == "reentrant"
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    config = {"layers": [0, 1], "positions": "f2+l2", "low_rank_dimension": 2, "init_weights": False, **kwargs}
    model = get_peft_model(base, ReftConfig(component=component, **config))
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.3)
    return model.train()


def _batch():
    ids, mask = padded_batch([10, 7, 9], side="right", seed=4)
    labels = torch.where((mask.cumsum(dim=1) > 4) & mask.bool(), ids, -100)  # 4 prompt tokens per row
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "use_cache": False}


def _step(model, call):
    """Loss and every trainable parameter's gradient of one forward + backward through `call`."""
    model.zero_grad()
    loss = call(**_batch()).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("checkpointing", [None, "non_reentrant"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_the_forward_pass_is_one_graph(component, checkpointing, training):
    model = _model(component, checkpointing).train(training)
    if checkpointing:
        # transformers' and peft's input-gradient hook (`enable_input_require_grads`, for reentrant checkpointing)
        # breaks the graph of any adapter, LoRA's too; without it, nothing does
        model.get_base_model().get_input_embeddings()._forward_hooks.clear()
    explanation = torch._dynamo.explain(model)(**_batch())
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def test_a_packed_row_is_one_graph_and_trains_as_eager():
    """Two sequences in one row (TRL's padding-free layout: position_ids restarting, no attention mask)."""
    ids = torch.randint(3, 90, (1, 20), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100  # the first sequence's prompt (tokens 0-3) ...
    labels[0, 8:13] = -100  # ... and the second's (tokens 8-12)
    batch = {"input_ids": ids, "position_ids": torch.cat([torch.arange(8), torch.arange(12)])[None], "labels": labels}
    model = _model("block_output")
    explanation = torch._dynamo.explain(model)(**batch)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    torch._dynamo.reset()
    results = []
    for call in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        model.zero_grad()
        loss = call(**batch).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (eager_loss, eager_grads), (loss, grads) = results
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for grad, eager_grad in zip(grads, eager_grads):
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-6)


def test_a_frozen_adapter_compiles_to_one_graph_with_eager_logits(tmp_path):
    """An adapter loaded for inference is frozen (its R is cached between eager calls, computed in the graph when
    compiled)."""
    _model("mlp_output").save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(tiny_model(layers=3), tmp_path).eval()
    assert not any(p.requires_grad for p in model.parameters())
    batch = {k: v for k, v in _batch().items() if k != "labels"}
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(**batch)
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
        eager = model(**batch).logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(**batch).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [None, "non_reentrant", "reentrant"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_compiled_training_equals_eager(component, checkpointing):
    eager_loss, eager_grads = _step(model := _model(component, checkpointing), model)
    model = _model(component, checkpointing)
    if checkpointing:
        model.get_base_model().get_input_embeddings()._forward_hooks.clear()  # see above; eager keeps it
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for _ in range(2):  # the second step reuses the compiled graph
        loss, grads = _step(model, compiled)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == eager_grads.keys()
        for name, grad in grads.items():
            assert grad is not None and grad.abs().sum() > 0, name  # every intervention trains
            torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("checkpointing", [None, "non_reentrant", "reentrant"])
@pytest.mark.parametrize("component", ["block_output", "attention_output"])
def test_a_layer_that_dynamo_splits_still_trains_as_eager(component, checkpointing):
    """A graph break inside the layer (here a hook on a norm; in practice e.g. data-dependent MoE routing, or
    transformers 5.25's kernel routing under checkpointing): dynamo compiles around it, a checkpoint is run eagerly and
    its recomputation during backward, after the call, must still edit the attention output; a block-output edit
    then runs in a graph of its own, on the layer's output as that graph's input, and must get eager's gradients."""

    def model():
        model = _model(component, checkpointing)
        for layer in model.get_base_model().model.layers:
            layer.post_attention_layernorm.register_forward_hook(lambda m, a, o: (torch._dynamo.graph_break(), o)[1])
        return model

    compiled_model = model()
    loss, grads = _step(compiled_model, torch.compile(compiled_model, backend="aot_eager"))  # before any eager run
    eager_loss, eager_grads = _step(eager_model := model(), eager_model)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("component", ["mlp_output"])
def test_inductor_trains_a_checkpointed_component_edit_as_the_reference_says(component):
    model = _model(component, "non_reentrant")
    batch = _batch()
    with torch.no_grad(), model.disable_adapter():
        base = model.get_base_model()
        expected = reference_logits(base, raw_params(model), "loreft", batch["input_ids"], batch["attention_mask"],
                                    batch["labels"], 2, 2, share_weights=False,
                                    submodule=SUBMODULE[component]).float()
        unedited = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    eager_loss, eager_grads = _step(model, model)
    loss, grads = _step(model, torch.compile(model))  # inductor
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():
        logits = torch.compile(model)(**batch).logits
    attended = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[attended], expected[attended], rtol=1e-4, atol=1e-4)
    assert (logits[attended] - unedited[attended]).abs().max() > 1e-2  # the edit is there to be seen


@pytest.mark.parametrize("positions", ["f2+l2", "all"])
def test_compiled_generation_with_a_static_cache_gives_eager_tokens(positions):
    model = _model("block_output", positions=positions, low_rank_dimension=4).eval()
    ids, mask = padded_batch([10, 7, 9], side="left", seed=2)
    options = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 6, "do_sample": False}
    eager = model.generate(**options)
    with model.disable_adapter():
        assert not torch.equal(model.generate(**options), eager)  # the adapter changes the answer
    compile_config = CompileConfig(backend="aot_eager", fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles generation on accelerators only by default
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(2):
        compiled = model.generate(**options, cache_implementation="static", compile_config=compile_config)
        assert torch.equal(compiled, eager)
    # transformers only warns when it declines to compile (e.g. on a device it does not compile for): dynamo must
    # have captured the decoding steps, else this test compared eager with eager
    assert counters["stats"]["unique_graphs"] > graphs
