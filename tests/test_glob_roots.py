"""Roots whose names hold glob characters, spaces and unicode work on every store, and touch no sibling.

fsspec's bulk ``cat`` and ``rm`` expand ``[``, ``]``, ``*`` and ``?`` as patterns: with a root
``exp[1]`` next to ``exp1``, a prune deleted the sibling's checkpoint; ``*`` and ``?`` crashed.
"""

from __future__ import annotations

import pytest
import torch

from ckptstore import CheckpointManager

NAMES = ["exp[1]", "exp*", "exp?", "run with spaces", "ëxp-日本"]
SIBLINGS = {"exp[1]": "exp1", "exp*": "expA", "exp?": "expB"}  # what each pattern would match


def manager(store, name, **kwargs):
    return CheckpointManager(store.join(name), storage_options=store.storage_options, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_a_root_with_special_characters_works_and_spares_its_siblings(store, name):
    sibling = SIBLINGS.get(name)
    if sibling:
        manager(store, sibling).save({"w": torch.full((4,), -1.0)}, step=0)
    mgr = manager(store, name, keep_last=2, keep_best=1, monitor="loss", export_best="best.safetensors")
    for step, loss in enumerate([0.5, 0.1, 0.7, 0.9]):
        mgr.save({"model": {"w": torch.full((4,), float(step))}}, step=step, metrics={"loss": loss})
    assert [c.step for c in mgr.checkpoints()] == [1, 2, 3]
    assert mgr.verify() == {c.name: None for c in mgr.checkpoints()}
    target = {"model": {"w": torch.zeros(4)}}
    mgr.restore(target, which="best")
    assert torch.equal(target["model"]["w"], torch.full((4,), 1.0))
    mgr.delete(2)
    assert mgr.prune() == [] and [c.step for c in mgr.checkpoints()] == [1, 3]
    assert mgr.load_partial({"w": torch.zeros(4)}).loaded == ["w"]
    if sibling:
        other = manager(store, sibling)
        assert [c.step for c in other.checkpoints()] == [0]
        assert torch.equal(other.restore()["w"], torch.full((4,), -1.0))


@pytest.mark.parametrize("name", ["run-X", "run/"])
def test_a_checkpoint_s_url_keeps_every_character_of_its_root(store, name):
    """The URL a save returns is the root as given (a trailing slash aside) plus the folder."""
    info = manager(store, name).save({"w": torch.ones(2)}, step=1)
    assert info.url == f"{store.join(name).rstrip('/')}/step_00000001"
