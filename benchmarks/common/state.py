"""The synthetic state every benchmark saves and loads: GPT-shaped float32 tensors of a requested size.

Hidden size d is chosen so that ``layers`` blocks hold ~85% of the bytes (12 d^2 + 13 d parameters
per block: qkv, out, fc1, fc2 weights and biases, two layer norms); an embedding (vocab x d) takes
the rest, and a final norm closes it. The same shapes in every benchmark make their numbers
comparable. Every tensor is written (no lazily zeroed pages), so RSS counts what it should.
"""

from __future__ import annotations

import re
from typing import Any

LAYERS = 24
PARTIAL_STRIDE = 8  # the partial loads keep every 8th block: 0, 8 and 16 of 24 (~10.6% of the bytes)

Shapes = dict[str, tuple[int, ...]]


def state_shapes(size_bytes: int, layers: int = LAYERS) -> Shapes:
    """Shapes of a GPT-like float32 state of about ``size_bytes``: an embedding, ``layers`` blocks, a final norm."""
    params = size_bytes // 4
    d = max(64, round((0.85 * params / (12 * layers)) ** 0.5 / 64) * 64)
    while d > 64 and params - layers * (12 * d * d + 13 * d) - 2 * d < d:
        d -= 64
    vocab = max(1, (params - layers * (12 * d * d + 13 * d) - 2 * d) // d)
    shapes: Shapes = {"embed.weight": (vocab, d)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update({
            p + "ln1.weight": (d,), p + "ln1.bias": (d,),
            p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
            p + "attn.out.weight": (d, d), p + "attn.out.bias": (d,),
            p + "ln2.weight": (d,), p + "ln2.bias": (d,),
            p + "mlp.fc1.weight": (4 * d, d), p + "mlp.fc1.bias": (4 * d,),
            p + "mlp.fc2.weight": (d, 4 * d), p + "mlp.fc2.bias": (d,),
        })
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    return shapes


def partial_blocks(layers: int = LAYERS) -> list[int]:
    """The blocks a partial load keeps."""
    return list(range(0, layers, PARTIAL_STRIDE))


def partial_keys(shapes: Shapes) -> list[str]:
    """The keys of a partial load: every ``PARTIAL_STRIDE``-th block and the final norm, in ``shapes`` order."""
    out = []
    for k in shapes:
        m = re.match(r"layers\.(\d+)\.", k)
        if (m and int(m.group(1)) % PARTIAL_STRIDE == 0) or k.startswith("ln_f."):
            out.append(k)
    return out


def nbytes(shapes: Shapes, keys: list[str] | None = None) -> int:
    """float32 bytes of ``keys`` (default: all)."""
    total = 0
    for k in keys if keys is not None else shapes:
        n = 4
        for s in shapes[k]:
            n *= s
        total += n
    return total


def build_state(shapes: Shapes) -> dict[str, Any]:
    """float32 tensors of these shapes, uniform in [-0.02, 0.02) from a fixed seed."""
    import torch

    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=torch.float32)
        t.uniform_(-0.02, 0.02, generator=gen)
        state[name] = t
    return state


def build_model(shapes: Shapes, requires_grad: bool = False) -> Any:
    """A module whose state_dict has exactly these keys and shapes, zero-filled (every page touched)."""
    import torch

    root = torch.nn.Module()
    for key, shape in shapes.items():
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        t = torch.empty(shape, dtype=torch.float32)
        t.zero_()  # torch.zeros may map zero pages lazily; the model must be resident before the baseline
        mod.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=requires_grad))
    return root
