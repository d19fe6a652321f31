"""Self-distillation: every training response replaced by the AR parent's own greedy output, for lossless decoding.

    from llm2diff.training.self_distill import self_distill_dataset
    train = self_distill_dataset(dlm, train, max_new_tokens=128, batch_size=16)
    # prints: self-distillation: 1000 responses from the AR parent in 95.1 s (95.1 s per 1k), 12 cut at 128 tokens

Lossless decoding (`llm2diff.sampling.lossless`) keeps a drafted token only where it equals the parent's greedy
choice, so the adapter drafts well when it was trained on what the parent itself writes. With `self_distill: true`
in a recipe, `llm2diff train` calls this on the tokenized training set before training: each row's `prompt_ids`
(the prompt exactly as training renders it: chat template, system prompt) is continued greedily by the parent
(`dlm.ar_generate`, adapter off), and the continuation, up to and including its end-of-sequence token, becomes
the row's `response_ids`. A continuation that reaches `max_new_tokens` without ending is kept as it is (the
collator then ends it with end-of-sequence); rows that outgrow `max_length` are dropped. The eval set keeps its
original responses.

Results are cached under `<cache root>/self_distill/<key>/` (`responses.npz`, `meta.json`), the root being
`$LLM2DIFF_CACHE` or `~/.cache/llm2diff` unless `cache_dir` is given, with `key = sha256(fingerprint of the parent
(name, architecture, dtype, sampled weights, generation settings) + content_hash(data))`. Entries are written
atomically; delete the directory to force a recomputation. Under accelerate the main process generates first and
the others read its cache entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llm2diff.atomic import atomic_directory
from llm2diff.noise.score_cache import content_hash

if TYPE_CHECKING:  # pragma: no cover - typing only
    import datasets

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def self_distill_dataset(dlm, dataset: datasets.Dataset, max_new_tokens: int = 128, batch_size: int = 16,
                         max_length: int | None = None, cache_dir: str | Path | None = None,
                         device: torch.device | str | None = None, show_progress: bool = True) -> datasets.Dataset:
    """`dataset` with every `response_ids` replaced by the AR parent's greedy continuation of its `prompt_ids`.

    Args:
        dlm: the `DiffusionLM` about to be trained; its parent is `dlm.ar_parent()` (the adapter switched off, or
            the weights themselves before full fine-tuning).
        dataset: tokenized rows with `prompt_ids` and `response_ids` (`llm2diff.training.data`).
        max_new_tokens: the most tokens generated per response.
        batch_size: prompts per `generate` call (grouped by length to limit padding).
        max_length: drop rows whose prompt plus new response exceeds it (as tokenizing does); None keeps all.
        cache_dir: cache root (entries go to `<cache_dir>/self_distill/<key>`); default the llm2diff cache.
        device: generate there (`llm2diff train` passes the training device); the model is moved there if it is
            elsewhere, and stays.
        show_progress: show a tqdm progress bar while generating.
    """
    from accelerate import PartialState

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"self_distill_max_new_tokens and self_distill_batch_size must be >= 1, got "
                         f"{max_new_tokens} and {batch_size}")
    fingerprint = parent_fingerprint(dlm, max_new_tokens)
    key = hashlib.sha256((json.dumps(fingerprint, sort_keys=True) + content_hash(dataset)).encode()).hexdigest()
    entry = cache_root(cache_dir) / key
    with PartialState().main_process_first():  # the main process generates, the others then read its entry
        responses = _load_entry(entry, len(dataset))
        if responses is None:
            if device is not None and dlm.device != torch.device(device):
                dlm.model.to(device)
            responses = _generate_entry(entry, dlm, dataset, fingerprint, max_new_tokens, batch_size, show_progress)
        else:
            print(f"self-distillation: reused {len(responses)} cached responses of the AR parent ({key[:12]})",
                  flush=True)
    distilled = dataset.remove_columns("response_ids").add_column("response_ids", responses)
    if max_length is not None:
        keep = [i for i, (p, r) in enumerate(zip(distilled["prompt_ids"], responses)) if len(p) + len(r) <= max_length]
        if len(keep) < len(distilled):
            logger.warning("self-distillation: dropped %d of %d rows longer than max_length=%d with the parent's "
                           "response", len(distilled) - len(keep), len(distilled), max_length)
            distilled = distilled.select(keep)
    return distilled


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`<cache_dir>/self_distill`, by default under the llm2diff cache (`$LLM2DIFF_CACHE` or `~/.cache/llm2diff`)."""
    if cache_dir is None:
        from llm2diff.models.builtin import cache_dir as default_cache_dir

        cache_dir = default_cache_dir()
    return Path(cache_dir).expanduser() / "self_distill"


def parent_fingerprint(dlm, max_new_tokens: int) -> dict[str, Any]:
    """What the parent's greedy responses depend on: the base model (by name and by a sample of its weights), the
    mask token, end-of-sequence and generation settings, and the library versions."""
    import transformers

    config = dlm.config
    weights = hashlib.sha256()
    with dlm.ar_parent() as parent:
        for name, param in parent.named_parameters():
            if "lora_" in name or "trainable_tokens" in name:
                continue
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 1024)].float().cpu().numpy()
            weights.update(name.encode() + sample.tobytes())
        dtype = str(next(parent.parameters()).dtype)
    generation = dlm.model.generation_config
    return {
        "version": FORMAT_VERSION, "base_model": config.base_model_name_or_path, "architecture": config.architecture,
        "dtype": dtype, "weights": weights.hexdigest(), "mask_token_id": config.mask_token_id,
        "eos_token_ids": list(dlm.eos_token_ids), "repetition_penalty": generation.repetition_penalty,
        "max_new_tokens": max_new_tokens, "torch": torch.__version__, "transformers": transformers.__version__,
    }


def parent_responses(dlm, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16,
                     show_progress: bool = True) -> list[list[int]]:
    """The parent's greedy continuation of each prompt, up to and including end-of-sequence (or `max_new_tokens`
    tokens), generated `batch_size` prompts at a time, shortest first, left-padded."""
    from tqdm.auto import tqdm

    pad = dlm.tokenizer.pad_token_id
    eos = set(dlm.eos_token_ids)
    order = np.argsort([len(p) for p in prompts], kind="stable")
    responses: list[list[int] | None] = [None] * len(prompts)
    was_training = dlm.model.training
    try:
        with tqdm(total=len(prompts), desc="Self-distillation", unit="ex", disable=not show_progress) as bar:
            for begin in range(0, len(order), batch_size):
                indices = order[begin : begin + batch_size].tolist()
                width = max(len(prompts[i]) for i in indices)
                ids = torch.full((len(indices), width), pad, dtype=torch.long)
                mask = torch.zeros((len(indices), width), dtype=torch.long)
                for row, i in enumerate(indices):
                    ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
                    mask[row, width - len(prompts[i]):] = 1
                new = dlm.ar_generate(ids, mask, max_new_tokens=max_new_tokens)[:, width:].tolist()
                for row, i in enumerate(indices):
                    stop = next((n + 1 for n, token in enumerate(new[row]) if token in eos), len(new[row]))
                    responses[i] = new[row][:stop]
                bar.update(len(indices))
    finally:
        dlm.model.train(was_training)
    return responses


def _generate_entry(entry: Path, dlm, dataset, fingerprint: dict[str, Any], max_new_tokens: int, batch_size: int,
                    show_progress: bool) -> list[list[int]]:
    """Generate the responses, print one cost line, write the cache entry atomically."""
    start = time.perf_counter()
    prompts = [list(p) for p in dataset["prompt_ids"]]
    responses = parent_responses(dlm, prompts, max_new_tokens, batch_size, show_progress)
    seconds = time.perf_counter() - start
    eos = set(dlm.eos_token_ids)
    cut = sum(1 for r in responses if not r or r[-1] not in eos)
    per_1k = seconds / len(prompts) * 1000 if prompts else 0.0
    print(f"self-distillation: {len(prompts)} responses from the AR parent in {seconds:.1f} s ({per_1k:.1f} s per "
          f"1k), {cut} cut at {max_new_tokens} tokens", flush=True)
    meta = {"fingerprint": fingerprint, "rows": len(prompts), "cut": cut, "seconds": round(seconds, 3)}
    with atomic_directory(entry) as tmp:
        np.savez(tmp / "responses.npz", values=np.asarray([t for r in responses for t in r], dtype=np.int64),
                 lengths=np.asarray([len(r) for r in responses], dtype=np.int64))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return responses


def _load_entry(entry: Path, rows: int) -> list[list[int]] | None:
    """The cached responses, or None when absent, unreadable or not of `rows` rows."""
    if not (entry / "meta.json").is_file() or not (entry / "responses.npz").is_file():
        return None
    try:
        with np.load(entry / "responses.npz") as data:
            values, lengths = data["values"], data["lengths"]
    except (OSError, ValueError, KeyError) as err:
        logger.warning("ignoring unreadable self-distillation cache entry %s (%s); regenerating", entry, err)
        return None
    if len(lengths) != rows or int(lengths.sum()) != len(values):
        logger.warning("ignoring self-distillation cache entry %s: it does not match the dataset; regenerating", entry)
        return None
    ends = np.cumsum(lengths)
    return [values[end - n : end].tolist() for end, n in zip(ends, lengths)]
