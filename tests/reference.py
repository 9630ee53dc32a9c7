"""An independent reference for ReFT, written from the paper/pyreft formulas in plain Python.

It shares no code with `peft_reft`: it reads only raw parameter tensors from the tuner's modules, orthonormalises R
with its own Gram-Schmidt, computes positions per example with Python lists, and applies the edit token by token
through forward hooks on the bare model's decoder layers.
"""

import math

import torch


def gram_schmidt_rows(weight):
    """Rows of `weight` ([r, d]) orthonormalised in order (equals QR with a positive diagonal)."""
    rows = []
    for vector in weight.double():
        for previous in rows:
            vector = vector - (vector @ previous) * previous
        rows.append(vector / vector.norm())
    return torch.stack(rows)


def activation(name):
    if name is None:
        return lambda x: x
    return {"relu": torch.relu, "tanh": torch.tanh, "gelu": torch.nn.functional.gelu}[name]


def reference_edit(kind, params, h, act_fn=None):
    """Edited hidden vector for one token. `params`: dict of raw float64 tensors; `h`: [d] float64."""
    act = activation(act_fn)
    if kind in ("loreft", "consreft", "lobireft", "direft"):
        R = gram_schmidt_rows(params["rotate_layer.weight"])
    if kind == "loreft":
        W, b = params["learned_source.weight"].double(), params["learned_source.bias"].double()
        return h + R.T @ (act(W @ h + b) - R @ h)
    if kind == "noreft":
        W1, b = params["learned_source.weight"].double(), params["learned_source.bias"].double()
        W2 = params["proj_layer.weight"].double()
        return h + W2.T @ (act(W1 @ h + b) - W2 @ h)
    if kind == "consreft":
        return h + R.T @ (params["learned_source"].double() - R @ h)
    if kind == "lobireft":
        return h + R.T @ params["learned_source"].double()
    if kind == "direft":
        W, b = params["learned_source.weight"].double(), params["learned_source.bias"].double()
        return h + R.T @ act(W @ h + b)
    if kind == "nodireft":
        W1, b = params["learned_source.weight"].double(), params["learned_source.bias"].double()
        W2 = params["proj_layer.weight"].double()
        return h + W2.T @ act(W1 @ h + b)
    raise ValueError(kind)


def reference_positions(mask_row, label_row, first, last, everything=False):
    """Per token index -> window ('first'/'last') for one example, from the documented rule, in plain Python."""
    attended = [i for i, m in enumerate(mask_row) if m]
    if everything:
        return {i: "first" for i in attended}
    if label_row is not None:
        supervised = [i for i in attended if label_row[i] != -100]
        # the completion is the last run of consecutive supervised tokens; the prompt is what precedes it
        starts = [i for i in supervised if i - 1 not in supervised]
        if starts:
            attended = [i for i in attended if i < starts[-1]]
    n = len(attended)
    if n >= first + last:
        n_first, n_last = first, last
    else:
        n_first = min(first, max(math.ceil(n / 2), n - last))
        n_last = min(last, n - n_first)
    windows = {i: "last" for i in attended[n - n_last:]} if n_last else {}
    windows.update({i: "first" for i in attended[:n_first]})
    return windows


def decoder_layers(model):
    """The ModuleList holding one block per hidden layer (located independently of peft_reft)."""
    n = model.config.num_hidden_layers
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    assert len(lists) == 1, f"ambiguous layer stack in {type(model).__name__}"
    return lists[0]


def reference_logits(base_model, layer_params, kind, input_ids, attention_mask, labels, first, last,
                     share_weights, everything=False, act_fn=None, submodule=None):
    """Logits of `base_model` with the ReFT edit applied by hooks.

    layer_params: {layer_index: {"first": params, "last": params}} (with share_weights, "last" uses "first").
    submodule: None edits the layer's output; a name (e.g. "mlp") edits the output of that child of the layer.
    """
    layers = decoder_layers(base_model)
    batch_windows = [
        reference_positions(attention_mask[b].tolist(), None if labels is None else labels[b].tolist(), first, last,
                            everything)
        for b in range(input_ids.shape[0])
    ]
    handles = []
    for index, params in layer_params.items():
        def hook(module, args, output, params=params):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            for b, windows in enumerate(batch_windows):
                for t, window in windows.items():
                    which = "first" if (share_weights or window == "first" or "last" not in params) else "last"
                    edited = reference_edit(kind, params[which], hidden[b, t].double(), act_fn)
                    hidden[b, t] = edited.to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        target = layers[index] if submodule is None else getattr(layers[index], submodule)
        handles.append(target.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return base_model(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        for h in handles:
            h.remove()


def raw_params(peft_model, adapter="default"):
    """{layer_index: {"first"/"last": {param name: tensor}}} read from a ReFT PeftModel's state dict."""
    result = {}
    for key, value in peft_model.state_dict().items():
        marker = f".reft_interventions.{adapter}."
        if marker not in key:
            continue
        before, after = key.split(marker)
        layer = int(before.rsplit(".", 1)[1])
        group, name = after.split(".", 1)
        result.setdefault(layer, {}).setdefault("first" if group == "0" else "last", {})[name] = value.detach().clone()
    return result
