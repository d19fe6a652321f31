"""llm2diff passes a model's cache under the name the installed transformers expects, and the suite's check for
deprecated calls (tests/helpers_deprecations.py) blames the code that asked for the deprecated thing."""

from __future__ import annotations

import warnings

import helpers_deprecations
import pytest
import torch
from conftest import make_model

from llm2diff.compat import adopt_activation_checkpointing, cache_argument, cache_kwargs


def run_as(module: str, source: str, **names):
    """Run `source` as code of `module` (its frames carry that module name), with `names` in scope."""
    scope = {"__name__": module, **names}
    exec(compile(source, f"<{module}>", "exec"), scope)
    return scope


class Deprecating(torch.nn.Module):
    """`forward(old=...)` warns as transformers' `deprecate_kwarg` does; `old_method` as a deprecated method does."""

    def forward(self, new=None, **kwargs):
        if "old" in kwargs:
            warnings.warn("`old` is deprecated and will be removed in version 99. Use `new` instead.", FutureWarning,
                          stacklevel=2)
        return new if new is not None else kwargs.get("old")

    def old_method(self):
        warnings.warn("`old_method` is deprecated and will be removed in v99. Use `new_method` instead.", FutureWarning)


@pytest.fixture
def seen():
    yield helpers_deprecations.SEEN
    helpers_deprecations.SEEN.clear()  # the cases below cause them on purpose


def test_an_argument_passed_by_llm2diff_through_forwarders_is_blamed_on_llm2diff(seen):
    # like PEFT's forward: passes **kwargs on to the wrapped model
    forwarder = run_as("peft_like", "def forward(model, **kwargs):\n    return model(**kwargs)\n")["forward"]
    model = Deprecating()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        run_as("llm2diff._probe", "result = forward(model, new=1)", forward=forwarder, model=model)
        assert seen == []
        run_as("llm2diff._probe", "result = forward(model, old=1)", forward=forwarder, model=model)
    assert len(seen) == 1 and "<llm2diff._probe>:1: FutureWarning: `old` is deprecated" in seen[0]


def test_deprecated_use_inside_a_dependency_is_not_blamed_on_llm2diff(seen):
    library = run_as("library", "def step(model):\n    model.old_method()\n    return model(old=2)\n")["step"]
    model = Deprecating()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_as("llm2diff._probe", "library(model)", library=library, model=model)
        assert len(caught) == 2 and seen == []
        run_as("llm2diff._probe", "model.old_method()", model=model)
    assert len(seen) == 1 and "`old_method` is deprecated" in seen[0]


def test_the_cache_goes_in_under_the_installed_transformers_name():
    import inspect

    from transformers import Qwen2ForCausalLM, Qwen3ForCausalLM

    for cls in (Qwen2ForCausalLM, Qwen3ForCausalLM):
        assert cache_argument() in inspect.signature(cls.forward).parameters
    model = make_model("qwen3").eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with torch.no_grad():
            model(input_ids=ids[:, :3], use_cache=True, **cache_kwargs(cache))
            step = model(input_ids=ids[:, 3:], use_cache=True, **cache_kwargs(cache)).logits
            full = model(input_ids=ids).logits
    assert cache.get_seq_length() == 4  # the model filled the cache it was given
    torch.testing.assert_close(step[:, -1], full[:, -1])


@pytest.mark.parametrize("given, expected", [({}, True), ({"gradient_checkpointing": False}, False),
                                             ({"activation_checkpointing": False}, False),
                                             ({"gradient_checkpointing": True, "activation_checkpointing": False},
                                              False)])
def test_training_configs_take_gradient_checkpointing_without_a_warning(given, expected, tmp_path):
    from llm2diff.training.config import DiffusionSFTConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = DiffusionSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **given)
    assert args.activation_checkpointing is expected and args.gradient_checkpointing is expected


def test_adopt_activation_checkpointing_keeps_a_set_new_name():
    class Args:
        gradient_checkpointing, activation_checkpointing = True, None
        gradient_checkpointing_kwargs, activation_checkpointing_kwargs = {"use_reentrant": False}, {"x": 1}

    args = Args()
    adopt_activation_checkpointing(args)
    assert args.activation_checkpointing is True and args.activation_checkpointing_kwargs == {"x": 1}
