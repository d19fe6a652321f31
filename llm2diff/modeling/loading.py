"""Making a `DiffusionLM`: `adapt` a stock causal LM, or `load` a saved one (a local directory or a Hub model id).

    from llm2diff import adapt, load
    dlm = adapt(model, tokenizer, block_size=32, lora=LoraConfig(r=16, target_modules="all-linear"))
    dlm.save_pretrained("outputs/run"); dlm = load("outputs/run")

`adapt` works in place: it may add the mask token (resizing embeddings only when no spare row exists) and attaches
the LoRA (PEFT), with the mask token's embedding row trainable. `load` puts a saved adapter back on its base
(quantized as in training, for QLoRA) or loads full weights, with the tokenizer, the saved decoding and the
significance table. `load_tokenizer`, `saved_model_directory` (local or Hub) and `recorded_quantization` are the
pieces the commands reuse.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from llm2diff.atomic import finish_interrupted_save
from llm2diff.integrity import check_safetensors
from llm2diff.modeling.architectures import check_supported
from llm2diff.modeling.config import SIGNIFICANCE_NAME, DiffusionConfig, validate_block_size
from llm2diff.modeling.diffusion_lm import DiffusionLM
from llm2diff.modeling.mask_token import choose_mask_token
from llm2diff.modeling.significance import load_significance
from llm2diff.sampling.config import saved_decoding

logger = logging.getLogger(__name__)


def adapt(model, tokenizer, block_size: int = 32, lora=None, mask_token: str | None = None, shift: bool = True,
          **config_fields) -> DiffusionLM:
    """Turn a stock Qwen2/Qwen2.5/Qwen3/Llama causal LM into a `DiffusionLM`, in place.

    Args:
        model: a `*ForCausalLM` of a supported family.
        tokenizer: its tokenizer; a pad token is set (to end-of-sequence) if it has none.
        block_size: tokens per block (1 = the AR parent).
        lora: a `peft.LoraConfig` or None for no adapter (full fine-tuning). The mask token's embedding row is made
            trainable (`trainable_token_indices`) unless the config already names `embed_tokens` there.
        mask_token: force this mask token string (added if the tokenizer lacks it).
        shift: token shift (hidden state i-1 predicts token i); keep it on to preserve what the parent knows.
        config_fields: further `DiffusionConfig` fields (the training noise, prompt format, provenance).
    """
    model_type = check_supported(model)
    validate_block_size(block_size)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    choice = choose_mask_token(tokenizer, model, mask_token)
    base_name = config_fields.pop("base_model_name_or_path", None) or getattr(model, "name_or_path", None) or None
    config = DiffusionConfig(
        block_size=block_size, mask_token=choice.token, mask_token_id=choice.token_id, vocab_size=len(tokenizer),
        shift=shift, base_model_name_or_path=base_name, architecture=type(model).__name__, **config_fields,
    )
    config.base_model_source = {**(config.base_model_source or {}), "mask_token_choice": choice.how,
                                "model_type": model_type, "embedding_rows": model.get_input_embeddings().weight.shape[0]}
    if config.self_conditioning:  # a zero-initialised path: the adapted model computes what the parent computes
        from llm2diff.modeling.self_conditioning import ATTRIBUTE, attach_self_conditioning

        attach_self_conditioning(model)
        if lora is not None:  # trained and saved with the adapter
            lora.modules_to_save = sorted({*(lora.modules_to_save or []), ATTRIBUTE})
    if lora is not None:
        from peft import get_peft_model

        indices = dict(lora.trainable_token_indices or {}) if isinstance(lora.trainable_token_indices, dict) else {}
        if not indices and lora.trainable_token_indices:
            indices = {"embed_tokens": list(lora.trainable_token_indices)}
        rows = set(indices.get("embed_tokens", [])) | {choice.token_id}
        indices["embed_tokens"] = sorted(rows)
        lora.trainable_token_indices = indices
        model = get_peft_model(model, lora)
    return DiffusionLM(model, tokenizer, config, weights_are_parent=lora is None)


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer saved at `path`, exactly as its `tokenizer.json` defines it.

    A directory whose `tokenizer_config.json` declares the generic `TokenizersBackend` / `PreTrainedTokenizerFast`
    is loaded with that class: `AutoTokenizer` would otherwise pick the model type's own tokenizer class, which
    rebuilds the pre-tokenizer and decoder and silently changes a custom tokenizer. Anything else goes through
    `AutoTokenizer`.
    """
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory = Path(path)
    config = directory / "tokenizer_config.json"
    if config.is_file() and (directory / "tokenizer.json").is_file():
        declared = json.loads(config.read_text()).get("tokenizer_class")
        if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(directory)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def saved_model_directory(path: str | os.PathLike, revision: str | None = None, token: str | None = None) -> Path:
    """The local directory of a saved model: `path` itself, or a Hub model id's downloaded files.

    A save into `path` that was interrupted after its commit point is finished first (`finish_interrupted_save`).
    """
    local = Path(path).expanduser()
    if local.is_dir():
        try:
            finish_interrupted_save(local)
        except OSError as error:
            raise OSError(f"{local} holds a complete save that an interruption left unmoved, and moving it into "
                          f"place failed ({error}); make the directory writable and load again") from error
        return local
    from llm2diff.hub import download_model, looks_like_repo_id

    if not looks_like_repo_id(str(path)):
        raise FileNotFoundError(f"no saved model at {path}: expected a directory written by "
                                "DiffusionLM.save_pretrained, or a Hub model id owner/name")
    return Path(download_model(str(path), revision=revision, token=token))


def recorded_quantization(path: str | os.PathLike) -> dict | None:
    """How the base under the adapter saved at `path` was quantized in training (QLoRA), or None."""
    return (DiffusionConfig.load(path).base_model_source or {}).get("quantization")


def load(path: str | os.PathLike, dtype=None, device=None, attn_implementation: str | None = None,
         trust_remote_code: bool = False, is_trainable: bool = False, revision: str | None = None,
         token: str | None = None, quantize: bool | dict | None = None) -> DiffusionLM:
    """Load a `DiffusionLM` saved with `save_pretrained`: base model plus adapter, or a full model.

    `path` is a local directory or, when no such directory exists, a Hub model id (`owner/name`, as
    `llm2diff push` uploads it): its files are downloaded (`revision`, `token`; cached by huggingface_hub) and
    loaded the same way. The base checkpoint named in `diffusion_config.json` is loaded from safetensors (built-in
    aliases such as `smollm2-135m-instruct` resolve to their locally converted copy). `trust_remote_code` stays
    off unless asked.

    An adapter trained on a quantized base (QLoRA, `load_in_4bit` / `load_in_8bit`) is put back on that base
    quantized the same way (bitsandbytes, placed on `device`, default the current GPU or the CPU), with the
    adapter in the dtype it was saved in, so the model computes what it computed in training. `quantize`: None
    follows the record; False loads the base in full precision (logits move by the quantization error); a
    quantization record (as `ModelArguments.quantization_record()` writes it) quantizes that way instead.
    """
    from transformers import AutoModelForCausalLM

    from llm2diff.models.builtin import resolve_model_path

    path = saved_model_directory(path, revision=revision, token=token)
    config = DiffusionConfig.load(path)
    check_safetensors(path, ["adapter_model.safetensors", SIGNIFICANCE_NAME,
                             *sorted(p.name for p in path.glob("model*.safetensors"))])
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    adapter = (path / "adapter_config.json").is_file()
    quantization = _quantization_to_apply(path, config, quantize, adapter)
    if quantization is not None:
        from llm2diff.training.arguments import ModelArguments

        kwargs["quantization_config"] = ModelArguments.from_quantization_record(quantization).quantization_config()
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        kwargs["device_map"] = {"": str(device)}
    if adapter:
        from peft import PeftModel

        base_path = resolve_model_path(config.base_model_name_or_path)
        try:
            model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
        except OSError as error:
            from llm2diff.hub import unavailable_model

            raise unavailable_model(base_path, error, f"the base model the adapter at {path} was trained on") \
                from error
        rows = (config.base_model_source or {}).get("embedding_rows")
        if rows and rows != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows)
        if config.self_conditioning:  # PEFT puts the saved projection into it (modules_to_save)
            from llm2diff.modeling.self_conditioning import attach_self_conditioning

            attach_self_conditioning(model)
        if quantization is not None and is_trainable:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = PeftModel.from_pretrained(model, path, is_trainable=is_trainable)
        if quantization is not None:
            _adapter_to_saved_dtype(model, path)
        config.base_model_source = {**(config.base_model_source or {}), "quantization": quantization}
        if quantization is None:  # what this model now runs on
            config.base_model_source.pop("quantization")
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if config.self_conditioning:
            from llm2diff.modeling.self_conditioning import attach_self_conditioning, load_self_conditioning_weights

            attach_self_conditioning(model)
            if not load_self_conditioning_weights(model, path):
                raise ValueError(f"{path} records self_conditioning {config.self_conditioning!r}, but its weights "
                                 "hold no llm2diff_self_conditioning.proj.weight: the save is incomplete")
    if device is not None and quantization is None:
        model.to(device)
    if not is_trainable:
        model.eval()
    return DiffusionLM(model, tokenizer, config, significance=load_significance(path), decoding=saved_decoding(path, config))


def _quantization_to_apply(path: Path, config: DiffusionConfig, quantize: bool | dict | None,
                           adapter: bool) -> dict | None:
    """The quantization record `load` applies to the base, after checking the request against the saved model."""
    recorded = (config.base_model_source or {}).get("quantization")
    if isinstance(quantize, dict):
        wanted = quantize
    elif quantize is None:
        wanted = recorded
    elif quantize:
        if not recorded:
            raise ValueError(f"quantize=True re-applies the quantization an adapter was trained on, but {path} "
                             "records none (it was trained on full-precision weights): pass a quantization "
                             "record, e.g. ModelArguments(load_in_4bit=True).quantization_record()")
        wanted = recorded
    else:
        wanted = None
    if wanted and not adapter:
        raise ValueError(f"{path} holds full weights (no adapter): quantizing them on load is not supported here; "
                         "load it unquantized (quantize=False)")
    if recorded and not wanted:
        logger.warning("the adapter at %s was trained on a quantized base (%s); it is loaded on the full-precision "
                       "base, so its logits move by the quantization error", path, recorded)
    return wanted or None


def _adapter_to_saved_dtype(model, path: Path) -> None:
    """Cast the adapter's parameters to the dtype its file stores them in.

    PEFT loads adapter weights into float32 layers; under QLoRA TRL trains them in bfloat16, so without this cast
    the reloaded model would compute in another precision than the trained one.
    """
    from safetensors import safe_open

    file = path / "adapter_model.safetensors"
    if not file.is_file():
        return
    with safe_open(str(file), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    if len(dtypes) != 1:
        return
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(dtypes.pop())
    if dtype is None:
        return
    for name, param in model.named_parameters():
        if ("lora_" in name or "trainable_tokens" in name) and "lora_magnitude_vector" not in name:
            param.data = param.data.to(dtype)
