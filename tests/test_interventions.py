"""The intervention family: formulas, orthonormality, identity init, dtypes, parameter counts."""

import pytest
import torch
from reference import gram_schmidt_rows, reference_edit

from peft_reft.interventions import INTERVENTIONS, OrthonormalRotation, build_intervention, orthonormal_rows

D, R = 24, 4
EXPECTED_PARAMS = {
    "loreft": 2 * D * R + R, "noreft": 2 * D * R + R, "consreft": D * R + R,
    "lobireft": D * R + R, "direft": 2 * D * R + R, "nodireft": 2 * D * R + R,
}


def _build(kind, init_weights=False, dropout=0.0, act_fn=None):
    torch.manual_seed(0)
    return build_intervention(kind, D, R, dropout=dropout, act_fn=act_fn, init_weights=init_weights)


@pytest.mark.parametrize("kind", list(INTERVENTIONS))
def test_formula_matches_reference(kind):
    module = _build(kind)
    h = torch.randn(5, 3, D)
    params = {k: v.detach() for k, v in module.state_dict().items()}
    expected = torch.stack([reference_edit(kind, params, v.double()) for v in h.reshape(-1, D)]).reshape(h.shape)
    torch.testing.assert_close(module.edited(h), expected.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(INTERVENTIONS))
def test_parameter_count_and_no_square_buffers(kind):
    module = _build(kind)
    assert sum(p.numel() for p in module.parameters()) == EXPECTED_PARAMS[kind]
    assert all(t.numel() < D * D for t in module.state_dict().values())
    assert all(p.dtype == torch.float32 for p in module.parameters())


@pytest.mark.parametrize("kind", ["loreft", "noreft", "lobireft", "direft", "nodireft"])
def test_identity_at_init(kind):
    module = _build(kind, init_weights=True)
    h = torch.randn(7, D)
    torch.testing.assert_close(module.edited(h), h, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["loreft", "consreft", "lobireft", "direft"])
def test_rotation_has_orthonormal_rows_and_matches_gram_schmidt(kind):
    module = _build(kind)
    rotation = module.rotation
    assert rotation.shape == (R, D)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(R), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotation.double(), gram_schmidt_rows(module.rotate_layer.weight.detach()), atol=1e-5,
                               rtol=0)


def test_orthonormal_rows_is_scale_invariant_and_fixes_orthonormal_input():
    weight = torch.randn(R, D)
    torch.testing.assert_close(orthonormal_rows(weight), orthonormal_rows(1e-3 * weight), atol=1e-5, rtol=0)
    q = orthonormal_rows(weight)
    torch.testing.assert_close(orthonormal_rows(q), q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1, 1.0])
def test_rotation_stays_orthonormal_under_adamw_weight_decay(weight_decay):
    module = _build("loreft")
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=weight_decay)
    target = torch.randn(16, D)
    h = torch.randn(16, D)
    losses = []
    for _ in range(30):
        loss = (module.edited(h) - target).pow(2).mean()
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rotation = module.rotation.detach()
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(R), atol=1e-5, rtol=0)
    assert rotation.abs().max() > 0.1  # not collapsed to zero (the torch householder parametrization trap)
    assert losses[-1] < 0.8 * losses[0]


def test_half_precision_input_is_cast_in_and_out():
    module = _build("loreft")
    h = torch.randn(3, D, dtype=torch.bfloat16)
    out = module.edited(h)
    assert out.dtype == torch.bfloat16
    assert module.learned_source.weight.dtype == torch.float32
    torch.testing.assert_close(out.float(), module.edited(h.float()), atol=0.05, rtol=0.02)


def test_dropout_applies_to_the_edit_only():
    module = _build("lobireft", dropout=0.5)
    module.train()
    h = torch.randn(200, D)
    edit = module.learned_source @ module.rotation
    delta = module(h).detach()  # the module gives what it adds
    # every coordinate keeps h: dropped -> 0 edit, kept -> edit / (1 - p)
    dropped = delta.abs() < 1e-6
    kept = (delta - 2 * edit.detach()).abs() < 1e-5
    assert bool((dropped | kept).all()) and dropped.any() and kept.any()
    module.eval()
    torch.testing.assert_close(module.edited(h), h + edit, atol=1e-5, rtol=0)


def test_rotation_of_a_frozen_adapter_is_cached_and_follows_loads():
    module = _build("loreft")
    module.requires_grad_(False)  # as PeftModel.from_pretrained loads an adapter for inference
    first = module.rotation
    assert module.rotation is first  # reused while the weight is unchanged
    module.load_state_dict({k: v.clone() + 0.1 for k, v in module.state_dict().items()})
    second = module.rotation
    assert not torch.allclose(second, first)
    torch.testing.assert_close(second, orthonormal_rows(module.rotate_layer.weight), atol=1e-6, rtol=0)
    with torch.no_grad():
        module.rotate_layer.weight.mul_(-1.0)
    torch.testing.assert_close(module.rotation, orthonormal_rows(module.rotate_layer.weight), atol=1e-6, rtol=0)


def test_trainable_rotation_is_recomputed_even_after_fused_optimizer_steps():
    module = _build("loreft")
    with torch.no_grad():
        before = module.rotation
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1, fused=True)  # updates without a version bump
    module(torch.randn(4, D)).pow(2).sum().backward()
    optimizer.step()
    with torch.no_grad():
        after = module.rotation
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, orthonormal_rows(module.rotate_layer.weight.detach()), atol=1e-6, rtol=0)


def test_rotation_cached_under_inference_mode_serves_a_later_training_step():
    rotation = OrthonormalRotation(16, 3).requires_grad_(False)
    with torch.inference_mode():
        rotation()
    x = torch.randn(4, 16, requires_grad=True)
    (x @ rotation().T).square().sum().backward()  # R enters an autograd graph: must not be an inference tensor
    assert x.grad is not None and not rotation().is_inference()
