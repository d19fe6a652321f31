"""Benchmark: speed on a random-weight model of a real model's shape (SmolLM2-135M by default), no training and no
download, so it runs on any fresh machine, a GPU machine without network included. Two tables:

  passes      one cached forward pass over 1, 8, 16, 32 new positions after a 128-token prompt, in float32 and in
              bfloat16: whether a pass over a block costs about one token's pass on this hardware, which decides
              the block sampler's speed against the AR parent (and whether bfloat16 is the faster dtype here).
  generation  the AR parent's greedy `generate` against the block sampler (one step per block, 2 tokens per step,
              threshold 0.9), verified decoding and lossless mode, batch 1, for each attention backend asked for:
              seconds, tokens/s, forward passes per token, ratio to the parent, and whether lossless mode returned
              the parent's output. A random model's answers mean nothing and its confidences are low (threshold
              rules commit about one token per step): the table says that every decoding path runs on this device,
              dtype and backend, and what its passes cost. End-of-sequence never wins (its logit row is zeroed),
              so every row generates the full length.

Each table is printed with a header line naming the hardware (`llm2diff.hardware.describe`); `--json PATH` also
writes the rows, each with that line. Asserts nothing; exits 1 if a generation row failed (the table says which).

    python benchmarks/random_model.py passes                                  # SmolLM2 shape, CPU, one thread
    python benchmarks/random_model.py passes --positions 1,8,16 --repeats 20
    python benchmarks/random_model.py generation --shape tiny                 # seconds: every path runs
    python benchmarks/random_model.py generation --device cuda --dtype bfloat16 --attn sdpa,flash_attention_2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

# configurations of real checkpoints (the weights are random); all tie the LM head to the embeddings
SHAPES = {
    "smollm2-135m": ("llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                   intermediate_size=1536, vocab_size=49152, head_dim=64, rope_theta=100000.0,
                                   rms_norm_eps=1e-5, max_position_embeddings=8192)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                   intermediate_size=4864, vocab_size=151936, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                   max_position_embeddings=32768)),
    "tiny": ("llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=1024, max_position_embeddings=2048)),
}
SPARE_ROWS = 64  # embedding rows beyond the tokenizer: the mask token goes to one of them, as in real checkpoints
EOS_ID, PAD_ID = 2, 0


def build_model(shape: str, attn: str = "sdpa", seed: int = 0, dtype=None):
    """A randomly initialised causal LM of `shape` (on the CPU, float32 unless `dtype`), its end-of-sequence logit
    row zeroed."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    family, fields = SHAPES[shape]
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family](
        **fields, tie_word_embeddings=True, eos_token_id=EOS_ID, pad_token_id=PAD_ID, bos_token_id=None)
    config.name_or_path = f"random-{shape}"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype or torch.float32)
    with torch.no_grad():  # logit 0 against ~50k random ones: end-of-sequence is never the argmax
        model.get_output_embeddings().weight[EOS_ID].zero_()
    return model.eval()


def build_tokenizer(vocab_rows: int):
    """A word-level tokenizer with `vocab_rows - SPARE_ROWS` entries (ids 0-2 are pad, chat start and eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_rows - SPARE_ROWS)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])


def resolve(args):
    """(torch.device, dtype) from --device / --dtype ('auto': CUDA in bfloat16 when there is a GPU)."""
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this machine has no usable CUDA GPU (torch.cuda.is_available() is False)")
    dtype = getattr(args, "dtype", "auto")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return torch.device(device), getattr(torch, dtype)


def timed(fn, device):
    """Seconds one call of `fn` takes (CUDA work waited for), and its result."""
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def random_prompt(vocab_rows: int, length: int, batch: int, device, seed: int = 1):
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab_rows - SPARE_ROWS, (batch, length), generator=generator)
    return ids.to(device), torch.ones_like(ids).to(device)


# -- passes ---------------------------------------------------------------------------------------------------------
def passes_table(args, device, header: str) -> list[dict]:
    """Median milliseconds of a cached pass over each count of new positions, per dtype (interleaved, so a change in
    machine load hits every cell alike)."""
    import torch
    from transformers import DynamicCache

    from llm2diff.compat import cache_kwargs

    base = build_model(args.shape, args.attn, args.seed)
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    vocab = base.config.vocab_size
    models = {dtype: copy.deepcopy(base).to(device, dtype) for dtype in dtypes}
    del base
    prompt, _ = random_prompt(vocab, args.prompt_len, 1, device)
    counts = [int(n) for n in args.positions.split(",")]
    caches = {}
    with torch.inference_mode():
        for dtype, model in models.items():
            caches[dtype] = DynamicCache(config=model.config)
            model(prompt, use_cache=True, **cache_kwargs(caches[dtype]))
        times = {(dtype, n): [] for dtype in dtypes for n in counts}
        for repeat in range(args.warmup + args.repeats):
            for n in counts:
                new, _ = random_prompt(vocab, n, 1, device, seed=100 + repeat)
                positions = torch.arange(args.prompt_len, args.prompt_len + n, device=device)[None]
                for dtype, model in models.items():
                    seconds, _ = timed(lambda: model(new, position_ids=positions, **cache_kwargs(caches[dtype]),
                                                     use_cache=True, logits_to_keep=n), device)
                    caches[dtype].crop(-n)
                    if repeat >= args.warmup:
                        times[(dtype, n)].append(seconds)
    names = [str(d).replace("torch.", "") for d in dtypes]
    print(f"\n{header}")
    print(f"passes: random {args.shape}, {args.attn}, {args.prompt_len}-token prompt cached, median of {args.repeats} "
          f"(after {args.warmup} warm-up), {device}")
    print("\n| new positions in the pass | " + " | ".join(f"{n} ms" for n in names)
          + (f" | {names[1]} / {names[0]}" if len(names) == 2 else "") + " |")
    print("|---" * (len(names) + 1 + (len(names) == 2)) + "|")
    out = []
    for n in counts:
        ms = [1000 * statistics.median(times[(dtype, n)]) for dtype in dtypes]
        ratio = f" | {ms[1] / ms[0]:.2f}x" if len(ms) == 2 else ""
        print(f"| {n} | " + " | ".join(f"{m:.1f}" for m in ms) + ratio + " |")
        out.append({"table": "passes", "shape": args.shape, "attn": args.attn, "device": str(device),
                    "prompt_len": args.prompt_len, "positions": n, **{f"{name}_ms": round(m, 3)
                                                                      for name, m in zip(names, ms)},
                    "hardware": header})
    return out


# -- generation -----------------------------------------------------------------------------------------------------
ROWS = {
    "one step per block": {"max_steps_per_block": 1},
    "2 tokens per step": {"tokens_per_step": 2},
    "threshold 0.9": {"commit_rule": "threshold", "threshold": 0.9},
    "verified, threshold 0.7": {"mode": "verified", "threshold": 0.7},
    "lossless": {"mode": "lossless"},
}
COMPILED = ("one step per block, static cache + compile", {"max_steps_per_block": 1, "static_cache": True,
                                                           "compile": True})


def random_dlm(args, attn: str, device, dtype):
    from peft import LoraConfig

    from llm2diff import adapt

    model = build_model(args.shape, attn, args.seed, dtype)
    tokenizer = build_tokenizer(model.config.vocab_size)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    dlm = adapt(model, tokenizer, block_size=args.block_size, lora=lora, clean_attention="causal")
    dlm.model.to(device, dtype).eval()
    return dlm


def generation_table(args, device, dtype, header: str) -> tuple[list[dict], bool]:
    """Rows for each attention backend; returns them and whether every row ran."""
    import importlib.util

    import torch

    from llm2diff.sampling.config import DecodingConfig

    LIBRARY_DEFAULTS = DecodingConfig().to_dict()  # every row: exactly its settings over the library's defaults
    names = list(ROWS) if not args.rows else [r.strip() for r in args.rows.split(";") if r.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {'; '.join(ROWS)}")
    settings = [(n, ROWS[n]) for n in names] + ([COMPILED] if args.compile else [])
    table, ok = [], True
    for attn in args.attn.split(","):
        if attn == "flash_attention_2" and (device.type != "cuda" or importlib.util.find_spec("flash_attn") is None):
            why = "it needs a CUDA GPU" if device.type != "cuda" else "flash-attn is not installed"
            print(f"[generation] {attn} skipped: {why}", flush=True)
            continue
        try:
            dlm = random_dlm(args, attn, device, dtype)
        except Exception as exc:  # noqa: BLE001 - one backend that cannot load must not hide the others
            print(f"[generation] {attn}: the model did not load: {type(exc).__name__}: {exc}", flush=True)
            table.append({"attn": attn, "row": "model load", "error": f"{type(exc).__name__}: {exc}"})
            ok = False
            continue
        ids, mask = random_prompt(dlm.model.config.vocab_size, args.prompt_len, args.batch_size, device)
        n = args.new_tokens

        def parent():
            return dlm.ar_generate(ids, mask, max_new_tokens=n)

        dlm.ar_generate(ids, mask, max_new_tokens=4)  # warm-up: kernels, allocator
        runs = [timed(parent, device) for _ in range(args.repeats)]
        parent_s = statistics.median(s for s, _ in runs)
        parent_seq = runs[0][1]
        parent_tokens = (parent_seq.shape[1] - ids.shape[1]) * ids.shape[0]
        base = {"attn": attn, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "shape": args.shape,
                "batch": args.batch_size, "prompt_len": args.prompt_len, "new_tokens": n, "hardware": header}
        table.append({**base, "row": "AR parent (greedy generate)", "seconds": parent_s,
                      "tokens_per_s": parent_tokens / parent_s, "ratio": 1.0, "passes_per_token": 1.0})
        print(f"[generation] {attn} AR parent: {parent_tokens / parent_s:.1f} tokens/s", flush=True)
        for name, kwargs in settings:
            def call(kwargs=kwargs):
                return dlm.generate(ids, mask, decoding=LIBRARY_DEFAULTS, max_new_tokens=n, **kwargs)

            try:
                timed(lambda: dlm.generate(ids, mask, decoding=LIBRARY_DEFAULTS, max_new_tokens=2 * args.block_size,
                                           **kwargs), device)  # warm-up (compiles, for the compiled row)
                runs = [timed(call, device) for _ in range(args.repeats)]
            except Exception as exc:  # noqa: BLE001 - report the failing path, measure the others
                print(f"[generation] {attn} {name} failed: {type(exc).__name__}: {exc}", flush=True)
                table.append({**base, "row": name, "error": f"{type(exc).__name__}: {exc}"})
                ok = False
                continue
            seconds = statistics.median(s for s, _ in runs)
            out = runs[0][1]
            tokens = int(out.num_new_tokens.sum())
            passes = out.nfe_draft + out.nfe_verify if kwargs.get("mode") == "lossless" else out.nfe
            row = {**base, "row": name, "seconds": seconds, "tokens_per_s": tokens / seconds,
                   "ratio": (tokens / seconds) / (parent_tokens / parent_s), "passes_per_token": passes / max(tokens, 1)}
            if kwargs.get("mode") == "lossless":
                width = max(out.sequences.shape[1], parent_seq.shape[1])
                pad = [torch.nn.functional.pad(t.cpu(), (0, width - t.shape[1])) for t in (out.sequences, parent_seq)]
                row["identical_to_parent"] = bool(torch.equal(*pad))
            table.append(row)
            print(f"[generation] {attn} {name}: {row['tokens_per_s']:.1f} tokens/s", flush=True)
        dlm = None  # frees the model before the next backend loads its own
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{header}")
    print(f"generation: random {args.shape}, block size {args.block_size}, LoRA r=16 (unmerged), batch "
          f"{args.batch_size}, {args.prompt_len}-token prompt, {args.new_tokens} new tokens, median of {args.repeats}, "
          f"{device}, {str(dtype).replace('torch.', '')}")
    print("\n| attention | decoding | tokens/s | ratio to AR parent | passes/token | note |")
    print("|---|---|---|---|---|---|")
    for r in table:
        if "error" in r:
            print(f"| {r['attn']} | {r['row']} | - | - | - | FAILED: {r['error'][:120]} |")
            continue
        note = ("" if "identical_to_parent" not in r
                else "output = parent's" if r["identical_to_parent"] else "output differs from the parent's")
        print(f"| {r['attn']} | {r['row']} | {r['tokens_per_s']:.1f} | {r['ratio']:.2f}x | "
              f"{r['passes_per_token']:.3f} | {note} |")
    return [{"table": "generation", **r} for r in table], ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="table", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--shape", default="smollm2-135m", choices=tuple(SHAPES))
    common.add_argument("--device", default="auto", help="auto (CUDA when there is a GPU), cpu, cuda, cuda:1, ...")
    common.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    common.add_argument("--prompt-len", type=int, default=128)
    common.add_argument("--repeats", type=int, default=None, help="timed runs per cell (default: 10 passes, 3 "
                        "generations)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--json", default=None, metavar="PATH", help="also write the rows (with the hardware) here")
    p = sub.add_parser("passes", parents=[common], help="cost of one cached pass per new positions and dtype")
    p.add_argument("--positions", default="1,8,16,32")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"))
    p.add_argument("--warmup", type=int, default=2)
    g = sub.add_parser("generation", parents=[common], help="decoding paths against the AR parent's generate")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on CUDA, float32 on a CPU")
    g.add_argument("--attn", default="sdpa", help="comma-separated: sdpa, eager, flash_attention_2 (skipped, with a "
                                                 "message, without flash-attn)")
    g.add_argument("--block-size", type=int, default=8)
    g.add_argument("--new-tokens", type=int, default=64)
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--rows", default=None, help=f"rows to run, ';'-separated (default all: {'; '.join(ROWS)})")
    g.add_argument("--compile", action="store_true", help="add a row with the static cache and torch.compile")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 10 if args.table == "passes" else 3
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    import torch

    from llm2diff.hardware import describe, warn_if_slow_dtype

    torch.set_num_threads(args.threads)
    device, dtype = resolve(args)
    header = f"hardware: {describe(args.threads, device)}"
    if args.table == "passes":
        rows, ok = passes_table(args, device, header), True
    else:
        warn_if_slow_dtype(dtype, device, hint="--dtype float32")
        rows, ok = generation_table(args, device, dtype, header)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
