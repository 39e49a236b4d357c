"""RNG state as a Stateful object, so that a resumed run draws the same random numbers.

Put ``RNGState()`` in the state you save; restoring loads the torch CPU generator, every
CUDA device's generator (when CUDA is present), numpy's global generator (when numpy is
imported) and Python's ``random``. Without it, dropout masks and data shuffles after a
resume differ from the uninterrupted run.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import torch


class RNGState:
    """The process's random number generators, saved and restored like a module.

    Example:
        >>> rng = RNGState()
        >>> saved = rng.state_dict()
        >>> a = torch.rand(1)
        >>> rng.load_state_dict(saved)
        >>> bool(torch.rand(1) == a)
        True
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            state["numpy"] = numpy.random.get_state(legacy=False)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"].cpu())
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
        if "numpy" in state:
            import numpy

            numpy.random.set_state(state["numpy"])
