"""Compute per-token significance scores for a dataset once, cache them on disk, and summarise them per token id.

Usage::

    from llm2diff.noise.scorers import make_scorer
    from llm2diff.noise.score_cache import add_significance_scores, significance_table

    scorer = make_scorer("surprisal", dlm=dlm)
    train = add_significance_scores(train, scorer)     # adds `response_scores` (float32 per response token)
    # prints: significance scores (surprisal): 960 examples in 35.2 s, 36.7 s per 1k examples
    table = significance_table(train, vocab_size=len(dlm.tokenizer))   # (vocab,) float32 in [0, 1]

The cache entry is `<cache root>/scores/<key>/` (`data/`, a one-column `datasets` dataset, and `meta.json` with
the fingerprint, row count and cost), with `key = sha256(scorer fingerprint + content_hash(dataset))`; the root is
`$LLM2DIFF_CACHE` or `~/.cache/llm2diff` unless `cache_dir` is given. Entries are written atomically (a temporary
directory beside the target, renamed into place), so an interrupted run leaves no partial entry. Delete the
directory to force a recomputation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llm2diff.atomic import atomic_directory

if TYPE_CHECKING:  # pragma: no cover - typing only
    import datasets

    from llm2diff.noise.scorers import SignificanceScorer

logger = logging.getLogger(__name__)

SCORES_COLUMN = "response_scores"
_ID_COLUMNS = ("prompt_ids", "response_ids")
_HASH_BATCH = 8192


# -- keys ----------------------------------------------------------------------------------------------------------
def content_hash(dataset: datasets.Dataset) -> str:
    """sha256 (hex) over the `prompt_ids` / `response_ids` content of `dataset`, in row order.

    Hashes the Arrow buffers' values and row lengths as int64 (so int32 and int64 columns hash alike), in fixed-size
    batches; other columns are ignored. A few hundred MB/s: negligible next to any model-based scorer.
    """
    import pyarrow.compute as pc

    _require_response_ids(dataset)
    columns = [c for c in _ID_COLUMNS if c in dataset.column_names]
    h = hashlib.sha256(json.dumps({"rows": len(dataset), "columns": columns}).encode())
    for table in dataset.select_columns(columns).with_format("arrow").iter(batch_size=_HASH_BATCH):
        for column in columns:
            array = table.column(column).combine_chunks()
            lengths = pc.list_value_length(array).fill_null(-1).to_numpy(zero_copy_only=False)
            values = pc.list_flatten(array).to_numpy(zero_copy_only=False)
            h.update(np.asarray(lengths, dtype=np.int64).tobytes())
            h.update(np.asarray(values, dtype=np.int64).tobytes())
    return h.hexdigest()


def score_cache_key(dataset: datasets.Dataset, scorer: SignificanceScorer) -> str:
    """The cache key: sha256 of the scorer's fingerprint (sorted JSON) followed by the data's content hash."""
    fingerprint = json.dumps(scorer.fingerprint(), sort_keys=True)
    return hashlib.sha256((fingerprint + content_hash(dataset)).encode()).hexdigest()


def scores_cache_root(cache_dir: str | Path | None = None) -> Path:
    """`<cache_dir>/scores`, by default under the llm2diff cache (`$LLM2DIFF_CACHE` or `~/.cache/llm2diff`)."""
    if cache_dir is None:
        from llm2diff.models.builtin import cache_dir as default_cache_dir

        cache_dir = default_cache_dir()
    return Path(cache_dir).expanduser() / "scores"


# -- scoring -------------------------------------------------------------------------------------------------------
def add_significance_scores(dataset: datasets.Dataset, scorer: SignificanceScorer, cache_dir: str | Path | None = None,
                            batch_size: int = 16, show_progress: bool = True) -> datasets.Dataset:
    """Return `dataset` with a `response_scores` column: one float32 per `response_ids` token, from `scorer`.

    Reuses the cached scores when this scorer (same fingerprint) already scored the same data; otherwise fits the
    scorer on `dataset`, scores it `batch_size` examples per `score_batch` call (shortest first, to limit padding),
    prints one cost line and caches the result. An existing `response_scores` column is replaced.

    Args:
        dataset: rows with `response_ids` (and usually `prompt_ids`; missing means empty prompts).
        scorer: a `SignificanceScorer` (see `llm2diff.noise.scorers.make_scorer`).
        cache_dir: cache root (entries go to `<cache_dir>/scores/<key>`); default the llm2diff cache.
        batch_size: examples per `score_batch` call.
        show_progress: show a tqdm progress bar while scoring.
    """
    import datasets

    _require_response_ids(dataset)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    key = score_cache_key(dataset, scorer)
    entry = scores_cache_root(cache_dir) / key
    scores = _load_entry(entry, dataset)
    if scores is not None:
        logger.info("reused cached %s scores (%s)", scorer.name, key[:12])
    else:
        scores = _compute_entry(entry, dataset, scorer, batch_size, show_progress)
    base = dataset.remove_columns([SCORES_COLUMN]) if SCORES_COLUMN in dataset.column_names else dataset
    result = datasets.concatenate_datasets([base, scores], axis=1)
    fmt = base.format
    if fmt["type"] is not None:
        columns = fmt["columns"]
        columns = None if columns is None or set(columns) >= set(base.column_names) else [*columns, SCORES_COLUMN]
        result.set_format(type=fmt["type"], columns=columns, output_all_columns=fmt["output_all_columns"],
                          **fmt["format_kwargs"])
    return result


def _compute_entry(entry: Path, dataset: datasets.Dataset, scorer: SignificanceScorer, batch_size: int,
                   show_progress: bool) -> datasets.Dataset:
    """Fit, score, print the cost line and write the cache entry atomically; returns the one-column dataset."""
    import datasets
    from tqdm.auto import tqdm

    start = time.perf_counter()
    scorer.fit(dataset)
    columns = [c for c in _ID_COLUMNS if c in dataset.column_names]
    rows = dataset.select_columns(columns).with_format(None)
    order = np.argsort(_row_lengths(dataset, columns), kind="stable")
    scores: list[list[float] | None] = [None] * len(dataset)
    with tqdm(total=len(dataset), desc=f"Scoring ({scorer.name})", unit="ex", disable=not show_progress) as bar:
        for begin in range(0, len(order), batch_size):
            indices = order[begin : begin + batch_size].tolist()
            batch = rows[indices]
            responses = batch["response_ids"]
            prompts = batch.get("prompt_ids") or [[] for _ in indices]
            out = scorer.score_batch(prompts, responses)
            _validate(out, responses, indices, scorer.name)
            for i, s in zip(indices, out):
                scores[i] = s
            bar.update(len(indices))
    seconds = time.perf_counter() - start
    per_1k = seconds / len(dataset) * 1000 if len(dataset) else 0.0
    print(f"significance scores ({scorer.name}): {len(dataset)} examples in {seconds:.1f} s, "
          f"{per_1k:.1f} s per 1k examples", flush=True)
    table = datasets.Dataset.from_dict(
        {SCORES_COLUMN: scores}, features=datasets.Features({SCORES_COLUMN: datasets.List(datasets.Value("float32"))}))
    meta = {"fingerprint": scorer.fingerprint(), "rows": len(dataset), "seconds": round(seconds, 3),
            "seconds_per_1k": round(per_1k, 3)}
    with atomic_directory(entry) as tmp, _quiet_datasets_progress():
        table.save_to_disk(str(tmp / "data"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return datasets.load_from_disk(str(entry / "data"))


def _load_entry(entry: Path, dataset: datasets.Dataset) -> datasets.Dataset | None:
    """The cached one-column dataset, or None when absent or not matching `dataset`'s response lengths."""
    import datasets

    if not (entry / "meta.json").is_file() or not (entry / "data").is_dir():
        return None
    try:
        cached = datasets.load_from_disk(str(entry / "data"))
    except (OSError, ValueError, FileNotFoundError) as err:
        logger.warning("ignoring unreadable score cache entry %s (%s); recomputing", entry, err)
        return None
    if cached.column_names != [SCORES_COLUMN] or not np.array_equal(
            _row_lengths(cached, [SCORES_COLUMN]), _row_lengths(dataset, ["response_ids"])):
        logger.warning("ignoring score cache entry %s: it does not match the dataset's responses; recomputing", entry)
        return None
    return cached


def _validate(out: Any, responses: list[list[int]], indices: list[int], name: str) -> None:
    if not isinstance(out, (list, tuple)) or len(out) != len(responses):
        got = len(out) if hasattr(out, "__len__") else type(out).__name__
        raise ValueError(f"scorer {name!r} returned {got} score lists for a batch of {len(responses)} rows: "
                         "score_batch must return one list per response")
    for i, scores, response in zip(indices, out, responses):
        if len(scores) != len(response):
            raise ValueError(f"scorer {name!r} returned {len(scores)} scores for row {i} whose response has "
                             f"{len(response)} tokens: score_batch must return one score per response token")
        if not all(math.isfinite(s) for s in scores):
            raise ValueError(f"scorer {name!r} returned a non-finite score for row {i}: {list(scores)}")


# -- per-token table -----------------------------------------------------------------------------------------------
def significance_table(dataset: datasets.Dataset, vocab_size: int) -> torch.Tensor:
    """Per token id, the mean over its occurrences of the within-example rank-normalised significance score.

    In each response the scores are ranked (ties share their average rank) and scaled to [0, 1]: the least
    significant token gets 0.0, the most significant 1.0, a one-token response 0.5. Ids never seen get 0.5.
    Returns a float32 tensor `(vocab_size,)`: the prior the coarse-to-fine sampler uses at inference.
    """
    if SCORES_COLUMN not in dataset.column_names or "response_ids" not in dataset.column_names:
        raise ValueError(f"significance_table needs 'response_ids' and {SCORES_COLUMN!r} columns (columns: "
                         f"{', '.join(dataset.column_names)}): run add_significance_scores(dataset, scorer) first")
    totals = np.zeros(vocab_size, dtype=np.float64)
    counts = np.zeros(vocab_size, dtype=np.int64)
    rows = dataset.select_columns(["response_ids", SCORES_COLUMN]).with_format(None)
    row = -1
    for batch in rows.iter(batch_size=4096):
        for ids, scores in zip(batch["response_ids"], batch[SCORES_COLUMN]):
            row += 1
            ids = np.asarray(ids, dtype=np.int64)
            if len(scores) != len(ids):
                raise ValueError(f"row {row}: {len(scores)} scores for {len(ids)} response tokens; recompute the "
                                 "scores with add_significance_scores")
            if ids.size == 0:
                continue
            if ids.min() < 0 or ids.max() >= vocab_size:
                raise ValueError(f"token id {int(ids.max())} is outside [0, {vocab_size}): pass a vocab_size that "
                                 "covers the tokenizer (len(tokenizer))")
            np.add.at(totals, ids, normalized_ranks(np.asarray(scores, dtype=np.float64)))
            np.add.at(counts, ids, 1)
    table = np.full(vocab_size, 0.5, dtype=np.float64)
    seen = counts > 0
    table[seen] = totals[seen] / counts[seen]
    return torch.from_numpy(table.astype(np.float32))


def normalized_ranks(scores: np.ndarray) -> np.ndarray:
    """Ranks of `scores` scaled to [0, 1] (lowest 0, highest 1), ties averaged; a single score -> 0.5."""
    n = len(scores)
    if n == 0:
        return np.zeros(0)
    if n == 1:
        return np.full(1, 0.5)
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], n]
    average = (starts + ends - 1) / 2.0
    ranks = np.empty(n)
    ranks[order] = np.repeat(average, ends - starts)
    return ranks / (n - 1)


# -- helpers -------------------------------------------------------------------------------------------------------
def _require_response_ids(dataset) -> None:
    columns = list(getattr(dataset, "column_names", None) or [])
    if "response_ids" not in columns:
        raise ValueError(f"the dataset has no 'response_ids' column (columns: {', '.join(columns) or 'none'}): "
                         "tokenize it first (llm2diff.training.data) so rows have prompt_ids / response_ids")


def _row_lengths(dataset: datasets.Dataset, columns: list[str]) -> np.ndarray:
    """Sum over `columns` (list columns) of each row's list length, as int64 `(rows,)`."""
    import pyarrow.compute as pc

    total = np.zeros(len(dataset), dtype=np.int64)
    start = 0
    for table in dataset.select_columns(columns).with_format("arrow").iter(batch_size=_HASH_BATCH):
        lengths = sum(np.asarray(pc.list_value_length(table.column(c)).fill_null(0).to_numpy(zero_copy_only=False),
                                 dtype=np.int64) for c in columns)
        total[start : start + table.num_rows] = lengths
        start += table.num_rows
    return total


@contextlib.contextmanager
def _quiet_datasets_progress() -> Iterator[None]:
    """Hide `datasets`' own "Saving the dataset" bar (the scoring bar is the one that matters)."""
    from datasets.utils import disable_progress_bars, enable_progress_bars, is_progress_bar_enabled

    was_enabled = is_progress_bar_enabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            enable_progress_bars()
