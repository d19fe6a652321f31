"""lm-evaluation-harness integration: a saved llm2diff model (or its AR parent) as the lm-eval model `llm2diff`.

    pip install "llm2diff[eval]"          # lm-eval==0.4.13
    python -m llm2diff.lm_eval --model llm2diff \
        --model_args pretrained=outputs/quickstart,batch_size=8,decoding.tokens_per_step=1,elbo_samples=32,seed=0 \
        --include_path eval/lm_eval_tasks --tasks gsm8k_local,arc_challenge_local --limit 50
    python -m llm2diff.lm_eval ... --model_args pretrained=outputs/quickstart,ar_parent=true   # the AR parent

`python -m llm2diff.lm_eval` takes lm-eval's own command line (`lm-eval run --help`): it imports this module, which
registers the model, then hands the same arguments to lm-eval's CLI (plain `lm-eval --model llm2diff` cannot find a
third-party model). From Python, pass an instance: `lm_eval.simple_evaluate(model=LLM2DiffLM(pretrained=...), ...)`.

Model arguments (`--model_args key=value,...`):
    pretrained: directory written by `DiffusionLM.save_pretrained` (or, from Python, a `DiffusionLM`).
    ar_parent: evaluate the AR parent (adapter disabled): greedy `generate` and exact log-likelihoods.
    batch_size: prompts per generate call, and Monte-Carlo samples per forward for the ELBO. It wins over
        lm-eval's `--batch_size` (whose default is 1); "auto" means 8.
    decoding.<setting>: any decoding setting (`DecodingConfig`, docs/sampling.md) over the model's saved ones,
        e.g. `decoding.mode=verified,decoding.threshold=0.7`; unset: the model decodes as saved. A request that
        samples (`do_sample`) uses the block sampler with its temperature, top_k and top_p.
    tokens_per_step, threshold: short for decoding.tokens_per_step, decoding.threshold.
    elbo_samples: Monte-Carlo samples of the masked-diffusion ELBO per (context, continuation).
    seed: seed of the ELBO noise (the same for every request, so the choices of one question share their noise
        draws) and of the sampler (seed + batch number).
    max_new_tokens: token budget of a request that gives no `max_gen_toks`.
    max_length: context limit (default the model's `max_position_embeddings`); longer contexts lose their start.
    device, dtype: where and in what precision to load (default: CUDA when available, else the CPU, which is also
        used when CUDA is asked for but absent; the checkpoint's dtype).

What each lm-eval request does:
    generate_until: prompts batched (grouped by generation settings, longest first) and generated through
        `llm2diff.evaluation.completions.complete`: the model as it decodes (`DiffusionLM.generate`) or the
        parent's `generate`, both with the request's `until` strings as `stop_strings` (one stop rule,
        `llm2diff.sampling.stops`); `max_gen_toks` is the budget; the decoded text is cut before the first stop
        string. Greedy unless the request sets `do_sample` (then `temperature`,
        `top_k`, `top_p` apply). One process: lm-eval's data parallelism (`accelerate launch`) is not supported.
    loglikelihood: `llm2diff.evaluation.likelihood.loglikelihood`: the Monte-Carlo ELBO (a lower bound of
        log p, `elbo_samples` samples, fixed `seed`), or the parent's exact log-likelihood. `is_greedy` is exact
        for the parent (argmax at every continuation position) and always False for the ELBO, which has no
        cheap greedy counterpart.
    loglikelihood_rolling: the whole string scored given only a BOS token (EOS when the tokenizer has no BOS) as
        context, i.e. log p(text | BOS); texts longer than `max_length` are cut into lm-eval's disjoint rolling
        windows, each scored given the tokens before it, and the window scores summed (for the diffusion model a
        sum of ELBOs, so a lower bound too).

Tokenization: the context and the continuation are tokenized separately (trailing whitespace of the context moved
onto the continuation, as lm-eval's HF model does), which is what `likelihood.loglikelihood` does with strings; the
context gets the tokenizer's special tokens (e.g. a Llama BOS) unless it already starts with the BOS text, as a
chat-templated prompt does; the continuation never does. Prompts are the task's own: pass `--apply_chat_template`
(with `--fewshot_as_multiturn` as you like) for a model trained on its chat template (`use_chat_template`); the
model's saved `system_prompt` is then added as the system message unless the prompt has one.
"""

from __future__ import annotations

import difflib
import inspect
import itertools
import json
import logging
from collections.abc import Sequence
from typing import Any

try:  # the top-level harness, not this module (imports are absolute)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "llm2diff.lm_eval needs lm-evaluation-harness: pip install 'llm2diff[eval]' (lm-eval==0.4.13)"
    ) from err

import torch
from tqdm.auto import tqdm

from llm2diff.sampling.config import DecodingConfig
from llm2diff.sampling.stops import cut_text_at_stop

__all__ = ["LLM2DiffLM", "main"]

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


# -- argument parsing (values arrive as strings from `--model_args`, or typed from Python / lm-eval's parser) ------
def _decoding_layer(arguments: dict[str, Any]) -> dict[str, Any]:
    """Take the `decoding.<setting>=value` model arguments out of `arguments`: decoding settings over the model's
    saved ones (values read as YAML: `decoding.mode=verified`, `decoding.threshold=0.7`)."""
    import yaml

    from llm2diff.sampling.config import check_names

    layer = {}
    for key in [k for k in arguments if k.startswith("decoding.")]:
        value = arguments.pop(key)
        layer[key.removeprefix("decoding.")] = yaml.safe_load(value) if isinstance(value, str) else value
    check_names(layer, "the decoding.* model arguments")
    return layer


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in {"none", "null", ""})


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in {"true", "1", "yes", "false", "0", "no"}:
        return value.strip().lower() in {"true", "1", "yes"}
    raise ValueError(f"model argument {name}={value!r}: expected true or false")


def _as_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool):
        raise ValueError(f"model argument {name}={value!r}: expected an integer")
    try:
        number = value if isinstance(value, int) else int(str(value).strip())
    except ValueError:
        raise ValueError(f"model argument {name}={value!r}: expected an integer") from None
    if number < minimum:
        raise ValueError(f"model argument {name}={value!r}: expected an integer >= {minimum}")
    return number


def _as_optional_float(name: str, value: Any) -> float | None:
    if _is_none(value):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"model argument {name}={value!r}: expected a number or None") from None


def _as_batch_size(value: Any) -> int:
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        logger.warning("batch_size=%s: llm2diff has no automatic batch size; using %d", value, DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    return _as_int("batch_size", value)


def _as_dtype(value: Any):
    if _is_none(value) or isinstance(value, torch.dtype) or value == "auto":
        return None if _is_none(value) else value
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"model argument dtype={value!r}: expected e.g. float32, bfloat16, float16 or auto")
    return dtype


def _resolve_device(device: Any) -> str:
    """The device to load on: CUDA when available unless told; a CUDA device asked for without CUDA (lm-eval's CLI
    asks for cuda:0 by default) falls back to the CPU with a warning, as lm-eval's HF model does."""
    if _is_none(device):
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device %s requested but CUDA is not available: using the CPU", device)
        return "cpu"
    return device


def _stop_list(until: Any) -> list[str]:
    if until is None:
        return []
    if isinstance(until, str):
        return [until]
    if isinstance(until, Sequence):
        return [str(s) for s in until if s]
    raise ValueError(f"generation argument until={until!r}: expected a string or a list of strings")


@register_model("llm2diff")
class LLM2DiffLM(TemplateLM):
    """An llm2diff `DiffusionLM` (or its AR parent) behind lm-eval's `LM` interface. See the module doc."""

    backend = "causal"

    def __init__(self, pretrained: Any = None, ar_parent: Any = False, batch_size: Any = DEFAULT_BATCH_SIZE,
                 tokens_per_step: Any = None, threshold: Any = None, elbo_samples: Any = 32, seed: Any = 0,
                 max_new_tokens: Any = 256, max_length: Any = None, device: Any = None, dtype: Any = None,
                 max_batch_size: Any = None, trust_remote_code: Any = False, **unknown: Any) -> None:
        super().__init__()
        self.decoding = _decoding_layer(unknown)  # `decoding.<setting>=value` model arguments
        if not _is_none(tokens_per_step):
            self.decoding.setdefault("tokens_per_step", _as_int("tokens_per_step", tokens_per_step))
        if not _is_none(threshold):
            self.decoding.setdefault("threshold", _as_optional_float("threshold", threshold))
        if unknown:
            valid = [p for p in inspect.signature(type(self).__init__).parameters if p not in {"self", "unknown"}]
            msgs = []
            for key in unknown:
                close = difflib.get_close_matches(key, valid, n=1)
                msgs.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"unknown llm2diff model argument(s) {', '.join(msgs)}; valid: {', '.join(valid)}")
        if pretrained is None or _is_none(pretrained):
            raise ValueError("model argument pretrained is required: the directory of a saved llm2diff model")
        from llm2diff.modeling.diffusion_lm import DiffusionLM
        from llm2diff.modeling.loading import load

        self.ar_parent = _as_bool("ar_parent", ar_parent)
        self.batch_size = _as_batch_size(batch_size)
        self.elbo_samples = _as_int("elbo_samples", elbo_samples)
        self.seed = _as_int("seed", seed, minimum=0)
        self.max_new_tokens = _as_int("max_new_tokens", max_new_tokens)
        if isinstance(pretrained, DiffusionLM):
            self.dlm = pretrained
            if not _is_none(device):
                self.dlm.model.to(_resolve_device(device))
        else:
            device = _resolve_device(device)
            self.dlm = load(str(pretrained), dtype=_as_dtype(dtype), device=device,
                            trust_remote_code=_as_bool("trust_remote_code", trust_remote_code))
        self.tokenizer = self.dlm.tokenizer
        self._device = self.dlm.device
        limit = getattr(self.dlm.model.config, "max_position_embeddings", None)
        self._max_length = _as_int("max_length", max_length) if not _is_none(max_length) else int(limit or 2048)
        self.stats = {"generated_tokens": 0, "row_forwards": 0, "generate_requests": 0}
        self._warned_keys: set[str] = set()

    # -- creation from lm-eval's command line ---------------------------------------------------------------------
    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None):
        """Like `LM.create_from_arg_obj`, but a key given in `--model_args` wins over lm-eval's own (its
        `--batch_size` defaults to 1, which would otherwise clash with `batch_size=` in the model arguments)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # -- what lm-eval reads -------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.tokenizer.pad_token_id)

    @property
    def prefix_token_id(self) -> int:
        """The context of an empty-context request and of `loglikelihood_rolling`: BOS, else EOS."""
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or "llm2diff").replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render lm-eval's chat history with the tokenizer's template (the model's `system_prompt` first unless
        the history has a system message), as training rendered prompts."""
        import jinja2

        system = self.dlm.config.system_prompt
        if system and not (chat_history and chat_history[0]["role"] == "system"):
            chat_history = [{"role": "system", "content": system}, *chat_history]
        kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                      continue_final_message=not add_generation_prompt)
        try:
            return self.tokenizer.apply_chat_template(chat_history, **kwargs)
        except jinja2.exceptions.TemplateError:
            logger.warning("chat template failed; retrying without the system message")
            return self.tokenizer.apply_chat_template([m for m in chat_history if m["role"] != "system"], **kwargs)

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in lm-eval's results under `config`: the settings and the sampler's forward-pass count."""
        cfg = self.dlm.config
        info = {
            "evaluated": "AR parent" if self.ar_parent else "diffusion",
            "block_size": cfg.block_size, "base_model": cfg.base_model_name_or_path,
            "decoding": None if self.ar_parent else DecodingConfig.resolve(self.dlm.decoding, self.decoding).to_dict(),
            "elbo_samples": self.elbo_samples, "seed": self.seed, "max_new_tokens": self.max_new_tokens,
            **self.stats,
        }
        if self.stats["generated_tokens"]:
            info["nfe_per_token"] = round(self.stats["row_forwards"] / self.stats["generated_tokens"], 4)
        params = sum(p.numel() for p in self.dlm.model.parameters())
        return {"model_num_parameters": params, "model_dtype": str(next(self.dlm.model.parameters()).dtype),
                "llm2diff": info}

    # -- tokenization -------------------------------------------------------------------------------------------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of `string`. `add_special_tokens=None`: the tokenizer's special tokens unless the string
        already starts with the BOS text (a chat-templated prompt)."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return list(self.tokenizer(string, add_special_tokens=add_special_tokens).input_ids)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokenized separately, trailing whitespace of the context moved onto the
        continuation (so " Paris" keeps its word-boundary token)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        return self.tok_encode(context), self.tok_encode(continuation, add_special_tokens=False)

    # -- loglikelihood -------------------------------------------------------------------------------------------
    def _score(self, context_ids: list[int], continuation_ids: list[int]) -> float:
        from llm2diff.evaluation.likelihood import loglikelihood

        return loglikelihood(self.dlm, context_ids, continuation_ids, use_parent=self.ar_parent,
                             num_samples=self.elbo_samples, seed=self.seed, batch_size=self.batch_size)

    def _fit_context(self, context_ids: list[int], continuation_ids: list[int]) -> list[int]:
        """Drop the start of the context so context + continuation (padded to whole blocks) fit `max_length`."""
        n = len(continuation_ids)
        block = 1 if self.ar_parent else self.dlm.config.block_size
        room = self.max_length - (-(-n // block) * block)
        if room < 1:
            raise ValueError(f"a continuation of {n} tokens does not fit max_length={self.max_length}")
        return context_ids[-room:]

    @torch.no_grad()
    def _ar_is_greedy(self, context_ids: list[int], continuation_ids: list[int]) -> bool:
        """Whether the parent's greedy choice (mask token and spare rows suppressed, as in `ar_generate`) is the
        continuation."""
        n = len(continuation_ids)
        with self.dlm.ar_parent() as parent:
            ids = torch.tensor([context_ids + continuation_ids], device=self.dlm.device)
            logits = parent(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False,
                            logits_to_keep=n + 1).logits[0, -(n + 1):-1].float()
        from llm2diff.modeling.parent import parent_suppressed_ids

        logits[:, parent_suppressed_ids(self.dlm)] = float("-inf")
        return bool((logits.argmax(-1).cpu() == torch.tensor(continuation_ids)).all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = []
        for (strings, context_ids, continuation_ids) in tqdm(requests, desc="llm2diff loglikelihood",
                                                             disable=disable_tqdm):
            context_ids = self._fit_context(list(context_ids), list(continuation_ids))
            ll = self._score(context_ids, list(continuation_ids))
            greedy = self._ar_is_greedy(context_ids, list(continuation_ids)) if self.ar_parent else False
            results.append((ll, greedy))
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, (ll, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        block = 1 if self.ar_parent else self.dlm.config.block_size
        window = max(1, (self.max_length - 1) // block * block)  # a whole window (+ one context token) fits
        results = []
        for (text,) in tqdm([req.args for req in requests], desc="llm2diff loglikelihood_rolling",
                            disable=disable_tqdm):
            tokens = self.tok_encode(text, add_special_tokens=False)
            total = 0.0
            for pair in get_rolling_token_windows(tokens, prefix_token=self.prefix_token_id, max_seq_len=window,
                                                  context_len=1):
                context_ids, predicted = make_disjoint_window(pair)
                total += self._score(self._fit_context(context_ids, predicted), predicted)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    # -- generation ----------------------------------------------------------------------------------------------
    def _settings(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        for key in set(gen_kwargs) - _GEN_KEYS - self._warned_keys:
            logger.warning("generation argument %r is not supported by llm2diff and is ignored", key)
            self._warned_keys.add(key)
        do_sample = _as_bool("do_sample", gen_kwargs.get("do_sample", False))
        temperature = float(gen_kwargs.get("temperature", 1.0 if do_sample else 0.0) or 0.0)
        if not do_sample:
            temperature = 0.0
        top_k = gen_kwargs.get("top_k")
        top_p = gen_kwargs.get("top_p")
        return {
            "until": _stop_list(gen_kwargs.get("until")),
            "max_gen_toks": _as_int("max_gen_toks", gen_kwargs.get("max_gen_toks", self.max_new_tokens)),
            "temperature": temperature,
            "top_k": None if _is_none(top_k) or temperature == 0 else int(top_k),
            "top_p": None if _is_none(top_p) or temperature == 0 else float(top_p),
        }

    def _generate_batch(self, prompts: list[list[int]], s: dict[str, Any], seed: int) -> list[str]:
        from llm2diff.evaluation.completions import complete

        request = {"max_new_tokens": s["max_gen_toks"], "stop_strings": tuple(s["until"] or ())}
        if s["temperature"] > 0:  # sampled: for the diffusion model, the block sampler (the decoder that samples)
            request.update(temperature=s["temperature"], seed=seed, top_k=s["top_k"], top_p=s["top_p"])
        if self.ar_parent:
            done = complete(self.dlm, prompts, request, ar_parent=True)
        else:  # the model's saved decoding, the `decoding.*` model arguments, then the request
            if s["temperature"] > 0:
                request["mode"] = "block"
            done = complete(self.dlm, prompts, DecodingConfig.resolve(self.dlm.decoding, self.decoding, request))
        self.stats["row_forwards"] += done.passes
        self.stats["generated_tokens"] += done.new_tokens
        return [cut_text_at_stop(self.tok_decode(r.tokens), s["until"]) for r in done.rows]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched generation; see the module doc. Returns the continuations in request order."""
        jobs = []  # (settings key, -prompt length, index, context, gen_kwargs, settings, prompt ids)
        for index, req in enumerate(requests):
            context, gen_kwargs = req.args[0], req.args[1]
            s = self._settings(dict(gen_kwargs or {}))
            room = self.max_length - s["max_gen_toks"]
            if room < 1:
                raise ValueError(f"max_gen_toks={s['max_gen_toks']} leaves no room for a prompt within "
                                 f"max_length={self.max_length}")
            prompt = self.tok_encode(context)
            if len(prompt) > room:
                logger.warning("prompt of %d tokens cut to its last %d to fit max_length", len(prompt), room)
                prompt = prompt[-room:]
            jobs.append((json.dumps(s, sort_keys=True), -len(prompt), index, context, gen_kwargs, s, prompt))
        jobs.sort(key=lambda job: job[:3])  # same settings together; longest prompts first (an OOM shows at once)
        outputs: list[str] = [""] * len(jobs)
        batch_number = 0
        with tqdm(total=len(jobs), desc="llm2diff generate_until", disable=disable_tqdm) as bar:
            for _, group in itertools.groupby(jobs, key=lambda job: job[0]):
                for batch in _chunks(list(group), self.batch_size):
                    texts = self._generate_batch([job[6] for job in batch], batch[0][5], self.seed + batch_number)
                    for job, text in zip(batch, texts):
                        outputs[job[2]] = text
                        self.cache_hook.add_partial("generate_until", (job[3], job[4]), text)
                    self.stats["generate_requests"] += len(batch)
                    batch_number += 1
                    bar.update(len(batch))
        return outputs


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m llm2diff.lm_eval ARGS`: lm-eval's CLI (`lm-eval ARGS`) with the `llm2diff` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else list(argv))]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
