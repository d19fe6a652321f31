"""Deprecation warnings caused by llm2diff's own code, found wherever the library that raises them points.

A `filterwarnings = error::FutureWarning:llm2diff` entry cannot see these: transformers raises a deprecated method's
warning from the method itself, and a deprecated forward argument's from the caller of `forward`, which is
`torch.nn.Module.__call__`. So `install()` wraps `warnings.warn` for the test session. For every FutureWarning and
DeprecationWarning it walks the stack out from the deprecated function to the code that asked for the deprecated
thing, stepping over frames that only pass it along: `nn.Module.__call__`, attribute forwarding (`__getattr__`), and
functions whose `**kwargs` carry the deprecated argument (PEFT's `forward`, TRL's forward wrappers). When that code
belongs to the llm2diff package, the warning is recorded in `SEEN`; conftest fails the test that saw it.

The deprecated thing is the first back-quoted name in the message, as transformers, TRL and PEFT write them
("`past_key_values` is deprecated ...", "`gradient_checkpointing_enable` is deprecated ...").
"""

from __future__ import annotations

import re
import sys
import types
import warnings

CATEGORIES = (FutureWarning, DeprecationWarning)
#: Functions that only hand a call or an attribute on to another object.
FORWARDERS = frozenset({"_call_impl", "_wrapped_call_impl", "__getattr__"})
#: "path:line: Category: message" of each deprecation caused by llm2diff since the last `SEEN.clear()`.
SEEN: list[str] = []

_original_warn = warnings.warn


def deprecated_name(message: str) -> str | None:
    """The first back-quoted name in a deprecation message (the argument, method or field it is about)."""
    match = re.search(r"`([A-Za-z_][\w.]*)`", message)
    return match.group(1) if match else None


def origin(frame: types.FrameType, message: str) -> types.FrameType | None:
    """The frame that asked for the deprecated thing; `frame` is the one that called `warnings.warn`."""
    name = deprecated_name(message)
    caller = frame.f_back
    while caller is not None:
        carried = caller.f_locals.get("kwargs") if name else None
        if caller.f_code.co_name in FORWARDERS or (isinstance(carried, dict) and name in carried):
            caller = caller.f_back
            continue
        return caller
    return None


def is_llm2diff(frame: types.FrameType | None) -> bool:
    """Whether `frame` runs code of the llm2diff package (tests and benchmarks are not part of it)."""
    module = frame.f_globals.get("__name__", "") if frame is not None else ""
    return module == "llm2diff" or module.startswith("llm2diff.")


def _warn(message, category=None, stacklevel=1, source=None, **kwargs):
    kind = type(message) if isinstance(message, Warning) else (category or UserWarning)
    if isinstance(kind, type) and issubclass(kind, CATEGORIES):
        cause = origin(sys._getframe(1), str(message))
        if is_llm2diff(cause):
            entry = f"{cause.f_code.co_filename}:{cause.f_lineno}: {kind.__name__}: {message}"
            if entry not in SEEN:
                SEEN.append(entry)
    return _original_warn(message, category, stacklevel + 1, source, **kwargs)


def install() -> None:
    """Route `warnings.warn` through the check (once; the warning itself is raised as before)."""
    if warnings.warn is not _warn:
        warnings.warn = _warn
