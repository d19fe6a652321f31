"""Naming a setting's valid choices in an error: one message everywhere a value must be one of a few names.

    check_choice("attn_backend", "flx", ("auto", "sdpa", "flex"))
    # ValueError: unknown attn_backend 'flx'; available: auto, sdpa, flex. Did you mean 'flex'?
"""

from __future__ import annotations

import difflib
from typing import Any


def did_you_mean(value: Any, options, cutoff: float = 0.6) -> str:
    """' Did you mean 'x'?' for the option nearest `value`, or '' when none is near."""
    near = difflib.get_close_matches(str(value), [str(o) for o in options], n=1, cutoff=cutoff)
    return f" Did you mean {near[0]!r}?" if near else ""


def check_choice(name: str, value: Any, options, *, error: type[Exception] = ValueError, cutoff: float = 0.6,
                 none_ok: bool = False) -> None:
    """Raise `error` naming the setting, its value, the options and the nearest one, unless `value` is an option
    (or None where `none_ok`)."""
    if value in options or (none_ok and value is None):
        return
    listed = ", ".join(str(o) for o in options) + (" (or none)" if none_ok else "")
    raise error(f"unknown {name} {value!r}; available: {listed}.{did_you_mean(value, options, cutoff)}")
