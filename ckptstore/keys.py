"""Matching a file's tensor names to a target's: tied weights, and the hint when almost nothing matches.

Names in a file are paths: a nested source is addressed with ``/`` (a Lightning checkpoint's
weights are ``state_dict/layer.weight``, a ckptstore checkpoint's ``model/layer.weight``),
while a module's names use ``.``. A load that matches nothing is always a mistake (the caller
would train from random weights), so it raises with the mapping that would have matched.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch

_SEPARATORS = "./"
_MAX_SEGMENTS = 3  # prefixes tried: up to this many leading name segments ...
_CANDIDATES = 8  # ... the most common ones, per side (the search is candidates^2 x names)


def ties(targets: dict[str, torch.Tensor], loaded: set[str]) -> set[str]:
    """Target names not in ``loaded`` that are the very same memory as a loaded one (tied weights).

    GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``; files store it once.

    Example:
        >>> emb = torch.nn.Parameter(torch.zeros(4, 2))
        >>> ties({"wte.weight": emb, "lm_head.weight": emb, "other": torch.zeros(1)}, {"wte.weight"})
        {'lm_head.weight'}
    """
    def where(t: torch.Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...]] | None:
        if t.numel() == 0 or t.device.type == "meta" or t.layout != torch.strided:  # sparse: no single storage
            return None
        return t.untyped_storage().data_ptr(), int(t.storage_offset()), tuple(t.shape), tuple(t.stride())

    landed = {w for k in loaded if (w := where(targets[k])) is not None}
    return {k for k, t in targets.items() if k not in loaded and (w := where(t)) is not None and w in landed}


def too_little_loaded(where: str, prefix: str | None, source: list[str], renamed: list[str], target: list[str],
                      loaded: int) -> str:
    """The error message of a load that matched (almost) nothing: examples and the mapping that would match."""
    if not source:
        return f"{where} holds no tensor" + (f" under {prefix!r}; pass key= with the state entry that holds the weights"
                                              if prefix else "")
    head = f"only {loaded} of the target's {len(target)} tensors" if loaded else "no tensor of the target"
    message = (f"{head} matched a tensor of {where} by name and shape; nothing was loaded. The file's names look like "
               f"{sorted(renamed)[:3]}, the target's like {sorted(target)[:3]}")
    best = suggest_mapping(renamed, target)
    if best is not None:
        old, new, count = best
        message += f". key_map={{{old!r}: {new!r}}} would match {count} of {len(target)}"
        if old.endswith("/") and not new and "/" not in old[:-1]:
            message += f" (or key={old[:-1]!r})"
    return message + ". Nested entries are addressed with '/'"


def suggest_mapping(source: Iterable[str], target: Iterable[str]) -> tuple[str, str, int] | None:
    """The prefix replacement ``(old, new, matches)`` that matches the most source names to target names.

    Example:
        >>> suggest_mapping(["state_dict/l.weight", "state_dict/l.bias"], ["l.weight", "l.bias"])
        ('state_dict/', '', 2)
        >>> suggest_mapping(["weight"], ["encoder.weight"])
        ('', 'encoder.', 1)
    """
    source, wanted = list(source), set(target)
    best: tuple[str, str, int] | None = None
    targets_prefixes = _prefixes(list(wanted))
    for old in _prefixes(source):
        stripped = [s[len(old):] for s in source if s.startswith(old)]
        for new in targets_prefixes:
            count = sum(new + s in wanted for s in stripped)
            if count and (best is None or count > best[2]) and (old, new) != ("", ""):
                best = (old, new, count)
    return best


def _prefixes(names: list[str]) -> list[str]:
    """``""`` and the most common leading segments (up to ``_MAX_SEGMENTS``, with their separator) of ``names``."""
    counts: Counter[str] = Counter()
    for name in names:
        ends = [i + 1 for i, c in enumerate(name) if c in _SEPARATORS][:_MAX_SEGMENTS]
        counts.update(name[:e] for e in ends)
    return ["", *(p for p, _ in counts.most_common(_CANDIDATES))]
