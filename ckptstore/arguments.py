"""The arguments of a save, checked before any I/O: the step, the name, the metrics.

Every configuration error of a save is raised before its first write, so a loop that treats
the exception as "not saved" is right.
"""

from __future__ import annotations

import difflib
import logging
import operator
import re
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError, InvalidNameError
from .storage import check_relative_path

log = logging.getLogger("ckptstore")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def step(value: Any) -> int:
    """``value`` as an int >= 0: any integral (``numpy.int64``, a 0-d integer tensor), not a bool.

    Example:
        >>> step(7)
        7
    """
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ConfigError(f"`step` must be an integer >= 0, got {value!r}") from None
    if number < 0:
        raise ConfigError(f"`step` must be an integer >= 0, got {value!r}")
    return number


def optional_positive(field: str, value: Any, kind: type[int] | type[float]) -> Any:
    """``value`` (None, or a number > 0 of ``kind``; an int is a float too), else ConfigError naming ``field``.

    Example:
        >>> optional_positive("save_interval_seconds", 30, float)
        30.0
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or not value > 0:
        raise ConfigError(f"`{field}` must be None or a{'n integer' if kind is int else ' number'} > 0, got {value!r}")
    return kind(value)


def checkpoint_name(name: str) -> str:
    """``name`` if it is one plain path segment, else InvalidNameError.

    Example:
        >>> checkpoint_name("step_00000010")
        'step_00000010'
    """
    check_relative_path(name)
    if not _NAME.match(name) or name.endswith((".tmp", ".json")):
        raise InvalidNameError(
            f"checkpoint name {name!r} must be one path segment of letters, digits, '.', '_' or '-' "
            "(no '/', '..', URL scheme or leading dot), like 'step_00000010'"
        )
    return name


def metrics(values: Mapping[str, Any], monitor: str | None, step: int) -> dict[str, float]:
    """Metrics as floats (numbers, 0-d tensors, numpy scalars); a ConfigError names any other.

    A save without ``monitor`` among them is legitimate (a preemption save mid-epoch) or a
    typo, so it logs a warning naming the metrics it has and the closest match.

    Example:
        >>> metrics({"loss": 1}, "loss", step=3)
        {'loss': 1.0}
    """
    numbers = {}
    for key, value in values.items():
        try:
            numbers[str(key)] = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise ConfigError(f"metric {key!r} must be a number, got {value!r}") from None
    if monitor and monitor not in numbers:
        close = difflib.get_close_matches(monitor, list(numbers), n=1)
        log.warning("step %d is saved without the monitored metric %r (its metrics: %s)%s; it cannot rank as best",
                    step, monitor, sorted(numbers) or "none", f"; did you mean {close[0]!r}?" if close else "")
    return numbers
