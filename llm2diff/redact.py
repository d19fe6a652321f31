"""Credentials never written down: the recipe, the command line and the trainer's arguments, redacted before any
file records them (`diffusion_config.json`, `training_args.bin`, run records, checkpoints, the Hub upload).

    redact({"hub_token": "hf_abc", "lr": 1e-4})         # {"hub_token": "<redacted>", "lr": 0.0001}
    redact("llm2diff train --hub_token hf_abc")          # "llm2diff train --hub_token <redacted>"
"""

from __future__ import annotations

import copy
import re
from typing import Any

# recipe keys whose values are credentials (not `mask_token`, `pad_token`...: those are vocabulary entries)
SECRET_KEY = re.compile(r"^(token|hub_token|hf_token|push_to_hub_token|password)$|_(api_key|secret|password)$")
SECRET_FLAG = re.compile(r"(--(?:hub[_-]token|hf[_-]token|token|push[_-]to[_-]hub[_-]token)(?:=|\s+))(\S+)")
REDACTED = "<redacted>"


def is_secret_key(key: Any) -> bool:
    """Whether a recipe key names a credential."""
    return bool(SECRET_KEY.search(str(key).lower()))


def redact(value: Any) -> Any:
    """A copy of a JSON-like value with credential-looking keys and command-line flags blanked out."""
    if isinstance(value, dict):
        return {k: (REDACTED if is_secret_key(k) and v else redact(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return SECRET_FLAG.sub(lambda m: m.group(1) + REDACTED, value)
    return value


def redact_argv(argv: list[str]) -> list[str]:
    """Command-line words with the value of every credential flag replaced (`--hub_token X`, `--hub_token=X`)."""
    words = []
    secret_next = False
    for word in argv:
        if secret_next:
            words.append(REDACTED)
            secret_next = False
            continue
        flag, eq, _ = word.partition("=")
        if flag.startswith("--") and is_secret_key(flag[2:].replace("-", "_")):
            if eq:
                words.append(f"{flag}={REDACTED}")
            else:
                words.append(word)
                secret_next = True
            continue
        words.append(word)
    return words


def redacted_training_args(args):
    """A shallow copy of trainer arguments with every credential field set to None (for `training_args.bin`)."""
    clean = copy.copy(args)
    for name in vars(args):
        if is_secret_key(name) and getattr(args, name):
            object.__setattr__(clean, name, None)
    return clean
