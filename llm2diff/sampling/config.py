"""`DecodingConfig`: every decoding setting, defined once, validated once, saved beside the model.

    from llm2diff.sampling.config import DecodingConfig
    decoding = DecodingConfig(mode="verified", threshold=0.7)
    out = dlm.generate(input_ids, decoding=decoding)                     # or decoding={"mode": "verified", ...}
    out = dlm.generate(input_ids, threshold=0.5)                         # one setting overridden for this call
    decoding.save_pretrained("outputs/run")                              # decoding_config.json

The decoder follows from `mode` alone ("block": the KV-cached block sampler; "verified": each block denoised,
then checked by the model's own causal stream; "lossless": the AR parent's greedy output, drafted by the
diffusion model), never from which settings happen to be given. A setting that does not apply to the mode is
refused when a call names it (`check_applicable`).

One merge rule (`DecodingConfig.resolve`): the library defaults, then what the model saved
(`decoding_config.json`), then the recipe or evaluation config, then the call. A layer is a `DecodingConfig`
(its settings that differ from the library defaults count) or a mapping (every key in it counts, so a mapping can
set a value back to its default).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm2diff.sampling.decoders import DECODERS

DECODING_CONFIG_NAME = "decoding_config.json"
EDIT_ACTIONS = ("replace", "remask")
REOPEN_TAILS = ("keep", "redenoise")
MODES = tuple(DECODERS)
ALL = MODES


def _setting(default: Any, help: str, modes: tuple[str, ...] = ("block",), group: str = "") -> Any:
    return field(default=default, metadata={"help": help, "modes": modes, "group": group})


@dataclass
class DecodingConfig:
    """How `DiffusionLM.generate` decodes. Fields are grouped; each applies to the modes its metadata names."""

    # -- which decoder, how long ---------------------------------------------------------------------------------
    mode: str = _setting("block", "Decoder: block (the block sampler), verified (denoise each block, then check it "
                         "with the model's causal stream; models trained with clean_attention: causal) or lossless "
                         "(the AR parent's greedy output, drafted by the diffusion model).", ALL, "decoder")
    max_new_tokens: int = _setting(256, "Most tokens generated per row (honoured exactly).", ALL, "decoder")
    stop_strings: tuple[str, ...] = _setting((), "Stop a row once its text contains one of these.", ALL, "decoder")
    merge_lora: bool = _setting(False, "Fold the LoRA into the base weights while decoding (faster passes; a second "
                                "copy of the adapted weights in memory; not on a quantized base).", ALL, "decoder")
    # -- block sampler: which positions to commit ------------------------------------------------------------------
    commit_rule: str = _setting("confidence", "Which positions to commit first: confidence, threshold, margin, "
                                "entropy, random or coarse_to_fine (models trained with a semantic_scorer).",
                                group="commit")
    tokens_per_step: int = _setting(1, "Tokens committed per denoising step (the minimum under a threshold).",
                                    group="commit")
    threshold: float | None = _setting(None, "Also commit every position whose confidence (the margin, for the "
                                       "margin rule) reaches this; verified decoding commits by it alone (0.9 "
                                       "unless set).", ("block", "verified"), "commit")
    significance_weight: float = _setting(2.0, "coarse_to_fine: priority = log(confidence) + weight * significance.",
                                          group="commit")
    confidence_floor: float | None = _setting(None, "Do not commit predictions below this confidence (each step "
                                              "still commits one).", group="commit")
    entropy_bound: float = _setting(1.0, "Entropy rule: commit the lowest-entropy positions while their summed "
                                    "entropy (nats) stays under this.", group="commit")
    sub_block_size: int | None = _setting(None, "Decode each block left to right in sub-blocks of this size (must "
                                          "divide the block size).", group="commit")
    max_steps_per_block: int | None = _setting(None, "At most this many denoising steps per block; the last one "
                                               "commits every position left.", group="commit")
    latent_steps: int = _setting(0, "Self-conditioned models: passes at the start of each block that commit "
                                 "nothing and only refine what the next pass is conditioned on (each costs a "
                                 "pass).", group="commit")
    # -- block sampler: correction ---------------------------------------------------------------------------------
    remask_threshold: float | None = _setting(None, "Correction: mask committed tokens of the open block again when "
                                              "their probability falls below this.", group="correction")
    remask_budget: int | None = _setting(None, "Correction: at most this many corrections (remasks and edits) per "
                                         "block and row (2 when only a threshold is set).", group="correction")
    edit_threshold: float | None = _setting(None, "Learned correction (models trained with editing noise): when the "
                                            "model now predicts another token at a committed position of the open "
                                            "block with at least this probability, act on it (edit_action).",
                                            group="correction")
    edit_action: str = _setting("replace", "Learned correction: 'replace' the disputed token by the model's "
                                "prediction, or 'remask' it (denoise that position again).", group="correction")
    reopen_threshold: float | None = _setting(None, "Learned correction of finished blocks (models trained with "
                                              "editing noise; on a clean_attention: causal model its AR stream "
                                              "judges): when the pass that appends a finished block predicts "
                                              "another token at one of its positions with at least this "
                                              "probability, the block is reopened: the token replaced, its "
                                              "keys/values recomputed (one extra pass).", group="correction")
    reopen_budget: int = _setting(2, "Reopening: at most this many tokens replaced per finished block and row.",
                                  group="correction")
    reopen_last: bool = _setting(False, "Reopening: judge the last block too (no later block's pass reads it: one "
                                 "more pass per call, where final answers are often written).", group="correction")
    reopen_last_below: float | None = _setting(None, "reopen_last: judge the last block only where one of its "
                                               "tokens was committed with less than this probability (a token "
                                               "given as a draft counts as unsure); the judging pass is skipped "
                                               "for rows that committed it surely. None: always judge.",
                                               group="correction")
    reopen_tail: str = _setting("keep", "Reopening: after a correction, 'keep' the block's later tokens (each "
                                "judged in turn), or 'redenoise' them: the first confident dispute is replaced, the "
                                "tokens after it are masked and denoised again, written under the corrected token "
                                "(what an inserted or dropped token needs).", group="correction")
    # -- block sampler: sampling -----------------------------------------------------------------------------------
    temperature: float = _setting(0.0, "Sampling temperature (0 = greedy).", group="sampling")
    top_k: int | None = _setting(None, "Sample among the k most likely tokens (needs temperature > 0).",
                                 group="sampling")
    top_p: float | None = _setting(None, "Sample among the most likely tokens whose probability reaches p (needs "
                                   "temperature > 0).", group="sampling")
    seed: int | None = _setting(None, "Seed of the sampler's random draws (temperature, random rule).",
                                group="sampling")
    # -- lossless ----------------------------------------------------------------------------------------------------
    parent_tail: int = _setting(0, "Lossless: when the open block has at most this many positions left, the parent "
                                "decodes them itself, one per pass (2 is faster on a CPU).", ("lossless",), "lossless")
    # -- block sampler: how it runs (the same tokens either way) ----------------------------------------------------
    use_cache: bool = _setting(True, "Keep the prompt and finished blocks in a KV cache (False: recompute the whole "
                               "sequence every step).", group="runtime")
    static_cache: bool = _setting(False, "Preallocate the KV cache (fixed shapes, for GPUs and torch.compile).",
                                  group="runtime")
    compile: bool = _setting(False, "Run the model through torch.compile (compiled once per model).", group="runtime")
    fuse_commit: bool = _setting(True, "Append a finished block's keys and values in the next block's pass.",
                                 group="runtime")
    drop_finished: bool = _setting(True, "Drop rows that stopped from the batch.", group="runtime")
    record_trajectory: bool = _setting(False, "Keep every step's canvas and confidences (for pictures).",
                                       group="runtime")

    def __post_init__(self) -> None:
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        self.stop_strings = tuple(self.stop_strings or ())
        self.validate()

    # -- checks ------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Refuse values outside their range, naming the setting and what it accepts."""
        from llm2diff.sampling.rules import COMMIT_RULES, NO_THRESHOLD

        if self.mode not in MODES:
            raise ValueError(f"unknown decoding mode {self.mode!r}; available: {', '.join(MODES)}"
                             f"{_nearest(self.mode, MODES)}")
        if self.commit_rule not in COMMIT_RULES:
            raise ValueError(f"unknown commit_rule {self.commit_rule!r}; available: {', '.join(COMMIT_RULES)}"
                             f"{_nearest(self.commit_rule, COMMIT_RULES)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0 and self.threshold != NO_THRESHOLD:
            raise ValueError(f"threshold must be in [0, 1] (a confidence, or a margin for the margin rule), got "
                             f"{self.threshold}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no top-k filter), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = no top-p filter), got {self.top_p}")
        if self.tokens_per_step < 1:
            raise ValueError(f"tokens_per_step must be >= 1, got {self.tokens_per_step}")
        filtered = [name for name, value, off in (("top_k", self.top_k, 0), ("top_p", self.top_p, 1.0))
                    if value is not None and value != off]
        if filtered and not self.temperature:
            raise ValueError(f"{' and '.join(filtered)} filter{'s' if len(filtered) == 1 else ''} what is sampled, "
                             "but temperature 0 decodes greedily (the most likely token), so it would have no "
                             f"effect: set a temperature above 0, or leave {' and '.join(filtered)} out")
        if self.confidence_floor is not None and not 0.0 <= self.confidence_floor <= 1.0:
            raise ValueError(f"confidence_floor must be in [0, 1], got {self.confidence_floor}")
        if self.entropy_bound < 0:
            raise ValueError(f"entropy_bound must be >= 0 (nats), got {self.entropy_bound}")
        if self.sub_block_size is not None and self.sub_block_size < 1:
            raise ValueError(f"sub_block_size must be >= 1, got {self.sub_block_size}")
        if self.max_steps_per_block is not None and self.max_steps_per_block < 1:
            raise ValueError(f"max_steps_per_block must be >= 1, got {self.max_steps_per_block}")
        if self.remask_threshold is not None and not 0.0 < self.remask_threshold < 1.0:
            raise ValueError(f"remask_threshold must be in (0, 1), got {self.remask_threshold}")
        if self.remask_budget is not None and self.remask_budget < 0:
            raise ValueError(f"remask_budget must be >= 0, got {self.remask_budget}")
        if self.remask_threshold is not None and self.remask_budget == 0:
            raise ValueError("remask_threshold is set but remask_budget is 0: give a budget of remasks per block "
                             "(e.g. 2), or unset remask_threshold")
        if self.edit_threshold is not None and not 0.0 < self.edit_threshold < 1.0:
            raise ValueError(f"edit_threshold must be in (0, 1) (a probability of the replacing token), got "
                             f"{self.edit_threshold}")
        if self.edit_action not in EDIT_ACTIONS:
            raise ValueError(f"unknown edit_action {self.edit_action!r}; available: {', '.join(EDIT_ACTIONS)}"
                             f"{_nearest(self.edit_action, EDIT_ACTIONS)}")
        if self.reopen_threshold is not None and not 0.0 < self.reopen_threshold < 1.0:
            raise ValueError(f"reopen_threshold must be in (0, 1) (a probability of the replacing token), got "
                             f"{self.reopen_threshold}")
        if self.reopen_budget < 1:
            raise ValueError(f"reopen_budget must be >= 1, got {self.reopen_budget}")
        if self.reopen_last and self.reopen_threshold is None:
            raise ValueError("reopen_last judges the last block as reopening judges the others: set reopen_threshold "
                             "too (e.g. 0.9)")
        if self.reopen_last_below is not None:
            if not self.reopen_last:
                raise ValueError("reopen_last_below gates reopen_last's judging pass: set reopen_last: true too, or "
                                 "unset reopen_last_below")
            if not 0.0 < self.reopen_last_below <= 1.0:
                raise ValueError(f"reopen_last_below must be in (0, 1] (a commit probability), got "
                                 f"{self.reopen_last_below}")
        if self.reopen_tail not in REOPEN_TAILS:
            raise ValueError(f"unknown reopen_tail {self.reopen_tail!r}; available: {', '.join(REOPEN_TAILS)}"
                             f"{_nearest(self.reopen_tail, REOPEN_TAILS)}")
        if self.reopen_tail == "redenoise" and self.reopen_threshold is None:
            raise ValueError("reopen_tail: redenoise re-denoises a reopened block after its correction: set "
                             "reopen_threshold too, or leave reopen_tail at 'keep'")
        if self.edit_threshold is not None and self.remask_budget == 0:
            raise ValueError("edit_threshold is set but remask_budget is 0: give a budget of corrections per block "
                             "(e.g. 2), or unset edit_threshold")
        if self.latent_steps < 0:
            raise ValueError(f"latent_steps must be >= 0, got {self.latent_steps}")
        if self.parent_tail < 0:
            raise ValueError(f"parent_tail must be >= 0, got {self.parent_tail}")
        if self.static_cache and not self.use_cache:
            raise ValueError("static_cache needs use_cache")

    @property
    def correction_budget(self) -> int:
        """Corrections (remasks and edits) allowed per block and row: the budget given, else 2 with a remask or edit
        threshold, else 0."""
        if self.remask_budget is not None:
            return self.remask_budget
        return 2 if self.remask_threshold is not None or self.edit_threshold is not None else 0

    @property
    def verified_threshold(self) -> float:
        """The threshold verified decoding denoises with (the threshold rule's default unless set)."""
        from llm2diff.sampling.rules import DEFAULT_THRESHOLD

        return DEFAULT_THRESHOLD if self.threshold is None else self.threshold

    # -- the merge rule ----------------------------------------------------------------------------------------------
    @classmethod
    def resolve(cls, *layers: DecodingConfig | Mapping[str, Any] | None) -> DecodingConfig:
        """The library defaults, then each layer in order (None skipped): see the module docstring."""
        values: dict[str, Any] = {}
        for layer in layers:
            values.update(explicit_settings(layer))
        return cls(**values)

    def replace(self, **changes: Any) -> DecodingConfig:
        """A copy with `changes` applied (checked as any setting)."""
        check_names(changes, "DecodingConfig.replace")
        return dataclasses.replace(self, **changes)

    def non_default(self) -> dict[str, Any]:
        """The settings that differ from the library defaults."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}

    # -- files -------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["stop_strings"] = list(self.stop_strings)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = DECODING_CONFIG_NAME) -> DecodingConfig:
        """A config from saved settings; unknown keys are refused, naming the file and the nearest setting."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source} must hold a JSON object of decoding settings, got {type(data).__name__}")
        check_names(data, source)
        return cls(**data)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `decoding_config.json` (every setting) into `directory`, atomically."""
        from llm2diff.atomic import write_json_atomic

        path = Path(directory) / DECODING_CONFIG_NAME
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> DecodingConfig | None:
        """The decoding saved in `directory`, or None when it holds no `decoding_config.json`."""
        path = Path(directory) / DECODING_CONFIG_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path} is not valid JSON ({err}): save the model again") from None
        return cls.from_dict(data, source=str(path))


def saved_decoding(path: str | os.PathLike, config=None) -> DecodingConfig:
    """The decoding saved beside a model: its `decoding_config.json`; for a model saved before that file existed,
    the sampler settings its `diffusion_config.json` held; else the library defaults."""
    saved = DecodingConfig.from_pretrained(path)
    if saved is not None:
        return saved
    if config is None:
        from llm2diff.modeling.config import DiffusionConfig

        config = DiffusionConfig.load(path)
    return DecodingConfig.resolve(getattr(config, "legacy_decoding", None))


# -- the fields, by what they apply to ---------------------------------------------------------------------------------
def setting_names() -> list[str]:
    """Every setting, in declaration order."""
    return [f.name for f in dataclasses.fields(DecodingConfig)]


def settings_for(mode: str) -> list[str]:
    """The settings that apply to `mode`."""
    return [f.name for f in dataclasses.fields(DecodingConfig) if mode in f.metadata["modes"]]


def setting_help(name: str) -> str:
    return DecodingConfig.__dataclass_fields__[name].metadata["help"]


def check_names(settings: Mapping[str, Any], where: str) -> None:
    """Refuse a name that is not a decoding setting, naming the nearest one."""
    names = setting_names()
    for name in settings:
        if name not in names:
            raise ValueError(f"{name!r} is not a decoding setting (in {where}){_nearest(name, names)}; the settings "
                             "are the fields of llm2diff.sampling.config.DecodingConfig (docs/sampling.md)")


def check_applicable(settings: Mapping[str, Any], mode: str, where: str = "this call") -> None:
    """Refuse settings named in `where` that `mode` would silently ignore."""
    ignored = [name for name in settings if name in setting_names() and name not in settings_for(mode)]
    if ignored:
        modes = sorted({m for name in ignored for m in DecodingConfig.__dataclass_fields__[name].metadata["modes"]})
        raise ValueError(f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply to {mode} decoding "
                         f"(only to {' or '.join(modes)}): leave {'it' if len(ignored) == 1 else 'them'} out of "
                         f"{where}, or set mode to {modes[0]!r}")


def explicit_settings(layer: DecodingConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings a merge layer sets: a config's non-default ones, every key of a mapping."""
    if layer is None:
        return {}
    if isinstance(layer, DecodingConfig):
        return layer.non_default()
    if not isinstance(layer, Mapping):
        raise TypeError(f"a decoding layer is a DecodingConfig or a mapping of settings, got {type(layer).__name__}")
    check_names(layer, "the decoding settings")
    return dict(layer)


def _nearest(name: Any, choices) -> str:
    near = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""
