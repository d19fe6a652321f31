"""Golden decoding outputs: every decoder and commit rule on the tiny test models, fixed seeds, recorded once.

The decoding redesign (one `DecodingConfig`, one `generate`) must not change a single token or pass count; the
recorded outputs in tests/golden/decoding.json are what `tests/test_golden_decoding.py` holds every call to.

    python tests/golden_decoding.py            # print what the cases give now, against the recorded file
    python tests/golden_decoding.py --write    # record them (only when a change of output is intended)
    python tests/golden_decoding.py --model outputs/quickstart [--write]   # the same on a trained model

A case is a model (family, block size, causal clean blocks or not, saved sampler defaults) and the decoding it asks
for, written as the settings it names (`mode` plus the settings of that mode); `run_case` turns that into a call.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_model, make_tokenizer  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "decoding.json"
PROMPTS = ["tom has 3 apples . he buys 4 more . how many ?", "ana has 9 pears ."]
MAX_NEW_TOKENS = 14

# (name, model, decoding): model keys: arch, causal (clean_attention causal), saved (sampler defaults saved with it)
CASES: list[tuple[str, dict, dict]] = []
for arch in ("qwen2", "qwen3", "llama"):
    CASES += [
        (f"{arch}/confidence", {"arch": arch}, {"mode": "block"}),
        (f"{arch}/threshold 0.5", {"arch": arch}, {"mode": "block", "commit_rule": "threshold", "threshold": 0.5}),
        (f"{arch}/sampled", {"arch": arch}, {"mode": "block", "temperature": 1.0, "seed": 3}),
        (f"{arch}/lossless", {"arch": arch}, {"mode": "lossless"}),
        (f"{arch}/verified 0.7", {"arch": arch, "causal": True}, {"mode": "verified", "threshold": 0.7}),
    ]
CASES += [
    ("qwen3/2 per step", {"arch": "qwen3"}, {"mode": "block", "tokens_per_step": 2}),
    ("qwen3/margin 0.3", {"arch": "qwen3"}, {"mode": "block", "commit_rule": "margin", "threshold": 0.3}),
    ("qwen3/entropy 1.0", {"arch": "qwen3"}, {"mode": "block", "commit_rule": "entropy", "entropy_bound": 1.0}),
    ("qwen3/random", {"arch": "qwen3"}, {"mode": "block", "commit_rule": "random", "tokens_per_step": 2, "seed": 1}),
    ("qwen3/coarse to fine", {"arch": "qwen3", "significance": True},
     {"mode": "block", "commit_rule": "coarse_to_fine", "significance_weight": 1.5}),
    ("qwen3/confidence floor", {"arch": "qwen3"}, {"mode": "block", "threshold": 0.3, "confidence_floor": 0.2}),
    ("qwen3/sub-blocks", {"arch": "qwen3"}, {"mode": "block", "tokens_per_step": 2, "sub_block_size": 2}),
    ("qwen3/one step per block", {"arch": "qwen3"}, {"mode": "block", "max_steps_per_block": 1}),
    ("qwen3/correction", {"arch": "qwen3"},
     {"mode": "block", "commit_rule": "threshold", "threshold": 0.7, "remask_threshold": 0.3, "remask_budget": 1}),
    ("qwen3/top-k", {"arch": "qwen3"}, {"mode": "block", "temperature": 0.8, "top_k": 5, "seed": 4}),
    ("qwen3/top-p", {"arch": "qwen3"}, {"mode": "block", "temperature": 1.0, "top_p": 0.9, "seed": 5}),
    ("qwen3/stop string", {"arch": "qwen3"}, {"mode": "block", "stop_strings": ["is", "*"]}),
    ("qwen3/no cache", {"arch": "qwen3"}, {"mode": "block", "tokens_per_step": 2, "use_cache": False}),
    ("qwen3/static cache", {"arch": "qwen3"}, {"mode": "block", "tokens_per_step": 2, "static_cache": True}),
    ("qwen3/unfused", {"arch": "qwen3"}, {"mode": "block", "fuse_commit": False, "drop_finished": False}),
    ("qwen3/merged", {"arch": "qwen3"}, {"mode": "block", "threshold": 0.5, "merge_lora": True}),
    ("qwen3/causal clean block sampler", {"arch": "qwen3", "causal": True}, {"mode": "block", "threshold": 0.5}),
    ("qwen3/lossless tail 2 merged", {"arch": "qwen3"}, {"mode": "lossless", "parent_tail": 2, "merge_lora": True}),
    ("qwen3/lossless stop", {"arch": "qwen3"}, {"mode": "lossless", "stop_strings": ["apples"]}),
    ("qwen3/verified merged", {"arch": "qwen3", "causal": True},
     {"mode": "verified", "threshold": 0.9, "merge_lora": True}),
    ("qwen3/saved defaults", {"arch": "qwen3", "saved": {"commit_rule": "threshold", "threshold": 0.7,
                                                         "remask_threshold": 0.3, "remask_budget": 1}}, {}),
    ("qwen3/saved defaults overridden", {"arch": "qwen3", "saved": {"commit_rule": "threshold", "threshold": 0.7}},
     {"tokens_per_step": 2}),
    ("qwen3/saved verified", {"arch": "qwen3", "causal": True, "saved": {"mode": "verified", "threshold": 0.7}},
     {}),
    ("llama/block 8 sampled correction", {"arch": "llama", "block_size": 8},
     {"mode": "block", "commit_rule": "threshold", "threshold": 0.6, "remask_threshold": 0.4, "remask_budget": 2,
      "temperature": 0.7, "seed": 9}),
]


def make_case_model(spec: dict):
    """The tiny LoRA-adapted model of a case: random LoRA weights and mask row (seeded), as if trained."""
    from peft import LoraConfig

    from llm2diff import adapt

    dlm = adapt(make_model(spec["arch"]), make_tokenizer(), block_size=spec.get("block_size", 4),
                lora=LoraConfig(r=4, target_modules="all-linear"),
                clean_attention="causal" if spec.get("causal") else "block")
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in dlm.model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    if spec.get("significance"):
        dlm.significance = torch.rand(dlm.model.get_input_embeddings().weight.shape[0],
                                      generator=torch.Generator().manual_seed(5))
    if spec.get("saved"):  # the decoding saved with the model (as a recipe's sampler_* keys save it)
        dlm.decoding = dlm.decoding.replace(**spec["saved"])
    return dlm


def inputs(dlm):
    """The two prompts, chat-rendered and left-padded."""
    from llm2diff.evaluation.completions import left_pad

    tok = dlm.tokenizer
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False),
               add_special_tokens=False).input_ids for p in PROMPTS]
    return left_pad(ids, tok.pad_token_id)


def run_case(dlm, decoding: dict) -> dict:
    """Decode the case's prompts as `decoding` says; the tokens and pass counts to hold fixed."""
    ids, mask = inputs(dlm)
    out = dlm.generate(ids, mask, decoding=decoding or None, max_new_tokens=MAX_NEW_TOKENS)
    result = {"sequences": out.sequences.tolist(), "num_new_tokens": out.num_new_tokens.tolist(), "nfe": out.nfe,
              "mode": out.mode}
    for name in ("nfe_per_row", "tokens_per_step", "remasked", "nfe_draft", "nfe_verify", "accepted_lengths",
                 "drafted_lengths", "parent_steps"):
        value = out.stats[name] if name in out.stats else out.nfe_per_row if name == "nfe_per_row" else None
        if value is not None:
            result[name] = value.tolist() if isinstance(value, torch.Tensor) else value
    return result


def run_all() -> dict[str, dict]:
    torch.set_num_threads(1)
    results = {}
    for name, spec, decoding in CASES:
        results[name] = run_case(make_case_model(spec), decoding)
    return results


# a trained model (the quickstart recipe's): its saved defaults and each decoder, on two built-in problems
MODEL_CASES: list[tuple[str, dict]] = [
    ("saved defaults", {}),
    ("confidence", {"mode": "block"}),
    ("threshold 0.9", {"mode": "block", "commit_rule": "threshold", "threshold": 0.9}),
    ("sampled", {"mode": "block", "temperature": 0.7, "seed": 1}),
    ("one step per block", {"mode": "block", "max_steps_per_block": 1}),
    ("merged", {"mode": "block", "threshold": 0.7, "merge_lora": True}),
    ("lossless", {"mode": "lossless"}),
    ("lossless tail 2 merged", {"mode": "lossless", "parent_tail": 2, "merge_lora": True}),
]


def run_model(path: str) -> dict:
    """The outputs of `MODEL_CASES` on the saved model at `path`, with its fingerprint."""
    from llm2diff import load
    from llm2diff.rundir import model_fingerprint

    torch.set_num_threads(1)
    dlm = load(path)
    global PROMPTS, MAX_NEW_TOKENS
    PROMPTS = ["Tom has 12 apples. He buys 5 more apples. How many apples does Tom have now?",
               "Ana has 9 pears. She eats 2 pears. How many pears does Ana have now?"]
    MAX_NEW_TOKENS = 40
    results = {"model_fingerprint": model_fingerprint(path)}
    for name, decoding in MODEL_CASES:
        results[name] = run_case(dlm, decoding)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="record the outputs as the golden file")
    parser.add_argument("--model", default=None, help="a trained model directory: its cases, in "
                        "tests/golden/<dir name>.json (checked by hand: the file holds for that model only)")
    args = parser.parse_args()
    if args.model:
        GOLDEN = GOLDEN.with_name(f"{Path(args.model).name}.json")
    results = run_model(args.model) if args.model else run_all()
    if args.write:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(results, indent=1) + "\n")
        print(f"recorded {len(results)} cases in {GOLDEN}")
    else:
        recorded = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
        for name, result in results.items():
            print(f"{'same' if recorded.get(name) == result else 'DIFFERENT':9} {name}")
