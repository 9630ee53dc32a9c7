"""The ReFT intervention family.

Every intervention is an `nn.Module` that maps hidden states `h` of shape `[..., d]` to what it adds to them,
`module(h) = dropout(edit(h))`; the edited states are `h + module(h)` (`module.edited(h)`). Written for a column
vector `h` (the paper's notation), with `R` an `r x d` matrix with orthonormal rows, `W` (`r x d`) and `b` (`r`) the
learned source `Wh + b`, and `act` an optional activation:

| name         | edit(h)                           | trainable parameters |
|--------------|-----------------------------------|----------------------|
| `"loreft"`   | R^T (act(W h + b) - R h)          | 2dr + r              |
| `"noreft"`   | W2^T (act(W1 h + b) - W2 h)       | 2dr + r              |
| `"consreft"` | R^T (b - R h)                     | dr + r               |
| `"lobireft"` | R^T b                             | dr + r               |
| `"direft"`   | R^T act(W h + b)                  | 2dr + r              |
| `"nodireft"` | W2^T act(W1 h + b)                | 2dr + r              |

The names and formulas are pyreft's. The paper's DiReFT (no orthogonality constraint) is `"nodireft"`; `"direft"`
keeps an orthonormal R.

R is kept orthonormal by construction: it is the QR orthonormalisation of an unconstrained `r x d` parameter,
computed once per forward pass in O(d r^2). It stays orthonormal under any optimizer and any weight decay (scaling the
parameter does not change R), and no `d x d` buffer exists.

Parameters live in float32 by default whatever the dtype of the model; hidden states are cast to the parameters'
dtype for the edit, which runs in that dtype also inside an autocast region, and the edit is cast back.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN


def orthonormal_rows(weight: torch.Tensor) -> torch.Tensor:
    """Return the matrix with orthonormal rows spanning the rows of `weight` (`[r, d]`, r <= d), via reduced QR.

    The signs are fixed so that the result is unique and continuous in `weight`; a `weight` that already has
    orthonormal rows is returned unchanged (up to rounding).
    """
    dtype = weight.dtype
    if dtype in (torch.float16, torch.bfloat16):  # QR needs single precision at least
        weight = weight.float()
    q, upper = torch.linalg.qr(weight.transpose(0, 1))  # [d, r], [r, r]
    signs = torch.where(torch.diagonal(upper) < 0, -1.0, 1.0).to(q.dtype)
    return (q * signs).transpose(0, 1).to(dtype)


def is_identity(act_fn: str | None) -> bool:
    """Whether the activation key `act_fn` is the identity (`None`, or ACT2FN's `"linear"`)."""
    return act_fn in (None, "linear")


def activation(act_fn: str | None) -> nn.Module:
    """The activation module for a `transformers` ACT2FN key; `None` means the identity."""
    return nn.Identity() if is_identity(act_fn) else ACT2FN[act_fn]


class OrthonormalRotation(nn.Module):
    """Holds the unconstrained parameter `weight` (`[r, d]`); calling it returns R with orthonormal rows.

    A frozen `weight` (an adapter loaded for inference) gets R computed once per value and reused; the cache is keyed
    on the tensor's identity and version, which `load_state_dict` and other in-place copies bump. A trainable weight
    is orthonormalised on every call: fused optimizers update parameters without bumping their version. Under
    torch.compile R is computed in the graph (a cache keyed on a tensor's address cannot be traced).
    """

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rank, hidden_size))
        if not self.weight.is_meta:  # QR has no meta kernel; weights created on meta are loaded afterwards
            nn.init.orthogonal_(self.weight)
        self._cache: tuple | None = None

    def forward(self) -> torch.Tensor:
        if self.weight.requires_grad or torch.compiler.is_compiling():  # compiled: R is part of the graph
            return orthonormal_rows(self.weight)
        # an R computed under torch.inference_mode() cannot enter a graph that autograd records later: keyed apart
        inference = torch.is_inference_mode_enabled()
        key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype, self.weight.device, inference)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, orthonormal_rows(self.weight))
        return self._cache[1]


class Intervention(nn.Module):
    """Base class: calling the module gives what it adds to the hidden states, `module(h) = dropout(edit(h))`; the
    edited states are `module.edited(h) = h + module(h)`. Subclasses implement `edit` on input in the parameters'
    dtype. Every parameter is read inside a module call (its own or a submodule's), so DeepSpeed ZeRO-3, which gathers
    a module's parameters around its calls, sees them whole."""

    def __init__(self, dropout: float = 0.0, act_fn: str | None = None):
        super().__init__()
        self.act_fn = activation(act_fn)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def edit(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """`dropout(edit(h))` in the dtype of `hidden`: what the intervention adds to the hidden states. The edit is
        computed in the parameters' dtype (float32 by default), also inside an autocast region."""
        device = hidden.device.type
        exact = torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()
        with exact:
            return self.dropout(self.edit(hidden.to(self.param_dtype))).to(hidden.dtype)

    def edited(self, hidden: torch.Tensor) -> torch.Tensor:
        """The edited hidden states, `h + dropout(edit(h))`."""
        return hidden + self(hidden)


class RotatedIntervention(Intervention):
    """An intervention with an orthonormal `R` (`rotation`, `[r, d]`) and, for most types, a learned source."""

    def __init__(self, hidden_size: int, rank: int, dropout: float = 0.0, act_fn: str | None = None):
        super().__init__(dropout, act_fn)
        self.rotate_layer = OrthonormalRotation(hidden_size, rank)

    @property
    def rotation(self) -> torch.Tensor:
        """The current R, `[r, d]` with orthonormal rows (differentiable)."""
        return self.rotate_layer()


class LoReFT(RotatedIntervention):
    """LoReFT: `h + R^T (act(W h + b) - R h)`. Identity at init: `W = R`, `b = 0` (needs a linear `act`)."""

    def __init__(self, hidden_size, rank, dropout=0.0, act_fn=None, init_weights=True):
        super().__init__(hidden_size, rank, dropout, act_fn)
        self.learned_source = nn.Linear(hidden_size, rank)
        if init_weights and not self.learned_source.weight.is_meta:
            with torch.no_grad():
                self.learned_source.weight.copy_(self.rotation)
                self.learned_source.bias.zero_()

    def edit(self, x):
        rotation = self.rotation
        return (self.act_fn(self.learned_source(x)) - F.linear(x, rotation)) @ rotation


class Projection(nn.Module):
    """Holds a plain projection `weight` (`[r, d]`, like `nn.Linear(d, r, bias=False)`); calling it returns a copy of
    the weight, read inside the call (the copy stays valid when DeepSpeed ZeRO-3 releases the parameter after it)."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rank, hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's initialisation

    def forward(self) -> torch.Tensor:
        return self.weight.clone()


class ProjectedIntervention(Intervention):
    """An intervention without orthogonality: learned source `W1 h + b` and a plain projection `W2` (`proj_layer`).
    Identity at init: `W2 = 0`, which holds for any activation."""

    def __init__(self, hidden_size, rank, dropout=0.0, act_fn=None, init_weights=True):
        super().__init__(dropout, act_fn)
        self.learned_source = nn.Linear(hidden_size, rank)
        self.proj_layer = Projection(hidden_size, rank)
        if init_weights:
            nn.init.zeros_(self.proj_layer.weight)


class NoReFT(ProjectedIntervention):
    """NoReFT: LoReFT without orthogonality, `h + W2^T (act(W1 h + b) - W2 h)`."""

    def edit(self, x):
        projection = self.proj_layer()
        return (self.act_fn(self.learned_source(x)) - F.linear(x, projection)) @ projection


class ConsReFT(RotatedIntervention):
    """ConsReFT: `h + R^T (b - R h)`, a constant target `b` in the subspace. Never the identity."""

    def __init__(self, hidden_size, rank, dropout=0.0, act_fn=None, init_weights=False):
        super().__init__(hidden_size, rank, dropout, act_fn)
        self.learned_source = nn.Parameter(torch.rand(rank))

    def edit(self, x):
        rotation = self.rotation
        return (self.learned_source - F.linear(x, rotation)) @ rotation


class LoBiReFT(RotatedIntervention):
    """LoBiReFT: `h + R^T b`, a learned bias in the subspace. Identity at init: `b = 0`."""

    def __init__(self, hidden_size, rank, dropout=0.0, act_fn=None, init_weights=True):
        super().__init__(hidden_size, rank, dropout, act_fn)
        self.learned_source = nn.Parameter(torch.zeros(rank) if init_weights else torch.rand(rank))

    def edit(self, x):
        return (self.learned_source @ self.rotation).expand_as(x)


class DiReFT(RotatedIntervention):
    """pyreft's DireftIntervention: `h + R^T act(W h + b)` with orthonormal R. Identity at init: `W = 0`, `b = 0`."""

    def __init__(self, hidden_size, rank, dropout=0.0, act_fn=None, init_weights=True):
        super().__init__(hidden_size, rank, dropout, act_fn)
        self.learned_source = nn.Linear(hidden_size, rank)
        if init_weights:
            nn.init.zeros_(self.learned_source.weight)
            nn.init.zeros_(self.learned_source.bias)

    def edit(self, x):
        return self.act_fn(self.learned_source(x)) @ self.rotation


class NoDiReFT(ProjectedIntervention):
    """NoDiReFT (the paper's DiReFT): `h + W2^T act(W1 h + b)`, no orthogonality."""

    def edit(self, x):
        return self.act_fn(self.learned_source(x)) @ self.proj_layer()


INTERVENTIONS: dict[str, type[Intervention]] = {
    "loreft": LoReFT,
    "noreft": NoReFT,
    "consreft": ConsReFT,
    "lobireft": LoBiReFT,
    "direft": DiReFT,
    "nodireft": NoDiReFT,
}


def identity_init_problem(intervention: str, act_fn: str | None) -> str | None:
    """Why `init_weights=True` cannot make this intervention the identity, or None if it can."""
    if intervention == "consreft":
        return "ConsReFT, h + R^T(b - Rh), equals h for every h only if R = 0, which is not orthonormal"
    if intervention == "loreft" and not is_identity(act_fn):
        return f"LoReFT with act_fn={act_fn!r} cannot satisfy act(Wh + b) = Rh for every h"
    if intervention == "direft" and not is_identity(act_fn):
        act_at_zero = activation(act_fn)(torch.zeros(1)).item()
        if act_at_zero != 0.0:
            return f"DiReFT with act_fn={act_fn!r} has act(0) = {act_at_zero:g}, not 0"
    return None


def build_intervention(
    intervention: str, hidden_size: int, rank: int, dropout: float, act_fn: str | None, init_weights: bool
) -> Intervention:
    """Instantiate the intervention called `intervention` (a key of `INTERVENTIONS`) in float32."""
    return INTERVENTIONS[intervention](hidden_size, rank, dropout=dropout, act_fn=act_fn, init_weights=init_weights)
