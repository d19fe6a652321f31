"""Benchmark: one block-diffusion training step against one plain causal-LM (AR) SFT step.

Both phases use the same model, the same LoRA setup (or full fine-tuning), the same batch of random examples and
AdamW with the same learning rate:

    ar         forward over `[prompt ; response]` with labels = -100 on the prompt
               (`model(input_ids, attention_mask, labels=...).loss`), backward, optimizer step
    diffusion  `llm2diff.training.objective.diffusion_loss` over the `[prompt ; clean response ; noisy response]`
               layout (`build_layout` + `pad_response_to_blocks`), backward, optimizer step

Responses are random ids ending in end-of-sequence and padded to whole blocks (`pad_response_to_blocks`); the AR
phase trains on exactly the same padded responses, so both phases see the same tokens.

It prints the median step time over `--steps` timed steps (after `--warmup` untimed ones), tokens/s (prompt +
response tokens of the batch per second, the same count for both phases), the peak memory of each phase and the
diffusion/AR ratios (the layout doubles the response, so ~2x time is the floor for the response part; the target is
<= 2.3x). It asserts nothing.

Each phase runs in its own fresh child process (this script called with `--phase ar|diffusion`), so neither phase
inherits the other's allocator state. Peak memory (the increase over the phase start, when model, batch and
optimizer are built):
    CUDA: `torch.cuda.max_memory_allocated` (reset at the phase start) minus the memory allocated at the phase start.
    CPU:  peak RSS minus the RSS just before the first step. The peak is the larger of a psutil RSS sampling thread
          (every 2 ms) and the child's `ru_maxrss` when that rose during the steps (`ru_maxrss` cannot be reset, so it
          only counts once it exceeds the high-water mark of loading). With the default `--cpu-memory separate` it
          comes from one more fresh child per phase (1 warm-up + 1 step) run with glibc's
          `MALLOC_MMAP_THRESHOLD_=131072`: large tensors are then mmap'ed and given back to the OS when freed, so RSS
          follows live memory. The timing children keep the default malloc (the fixed threshold makes steps slower),
          whose caching makes their RSS peak vary from run to run; `--cpu-memory same` reports that one instead.

Run:
    python benchmarks/train_step.py                                           # tiny random Qwen3, seconds
    python benchmarks/train_step.py --model smollm2-135m-instruct --threads 2
    python benchmarks/train_step.py --model /path/to/hf/checkpoint --device cuda --dtype bfloat16
    python benchmarks/train_step.py --rounds 3     # alternate ar/diffusion 3 times: steadier on a busy machine
    python benchmarks/train_step.py --ar-loss-weight 1.0   # diffusion with clean_attention causal + the AR loss
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time

RESULT_MARKER = "@@TRAIN_STEP_RESULT@@ "
DTYPES = ("auto", "float32", "bfloat16", "float16")
TINY_VOCAB_ROWS = 1024  # embedding rows of the tiny model; its tokenizer has far fewer entries (spare rows)


# -- models ------------------------------------------------------------------------------------------------------
def tiny_tokenizer():
    """A word-level tokenizer with eos / pad tokens and fewer entries than the tiny model's embedding rows."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")
    words = tuple(f"w{i}" for i in range(60)) + tuple(str(d) for d in range(10))
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    assert len(tok) < TINY_VOCAB_ROWS
    return tok


def tiny_model(dtype):
    """A small random Qwen3 (4 layers, hidden 128), built from a config: no download, steps take milliseconds."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=TINY_VOCAB_ROWS, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                         eos_token_id=2, pad_token_id=0, bos_token_id=None, tie_word_embeddings=False)
    config.name_or_path = "tiny-random-qwen3"
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    return model


def load_model_and_tokenizer(name: str, dtype):
    if name == "tiny":
        return tiny_model(dtype), tiny_tokenizer(), "tiny random Qwen3 (config in this script)"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm2diff.models.builtin import resolve_model_path

    path = str(resolve_model_path(name))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, f"{name} ({path})"


def resolve_device_dtype(args):
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    return torch.device(device), dtype


# -- one phase (child process) -----------------------------------------------------------------------------------
class RssSampler:
    """Samples this process's RSS in a background thread and keeps the maximum."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def ru_maxrss_bytes() -> int:
    import resource

    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024  # Linux reports KiB


def make_batch(args, vocab_rows: int, mask_id: int, eos_id: int):
    """Random prompts and responses (fixed seed). Responses end with eos and are padded to whole blocks."""
    import torch

    from llm2diff.training.layout import pad_response_to_blocks

    gen = torch.Generator().manual_seed(args.seed)
    excluded = torch.tensor(sorted({mask_id, eos_id}))

    def draw(n):
        ids = torch.randint(0, vocab_rows - len(excluded), (n,), generator=gen)
        for e in excluded.tolist():  # shift ids past each excluded id (sorted), keeps the draw uniform
            ids = ids + (ids >= e).long()
        return ids.tolist()

    prompts = [draw(args.prompt_len) for _ in range(args.batch_size)]
    # response_len - 1 body tokens + eos = response_len tokens (rounded up to whole blocks)
    responses = [pad_response_to_blocks(draw(max(args.response_len - 1, 1)), args.block_size, eos_id)
                 for _ in range(args.batch_size)]
    return prompts, responses


def run_phase(args) -> dict:
    import torch

    if args.memory_run:  # the peak is reached by the second step (optimizer state exists from the first)
        args.warmup, args.steps = 1, 1
    torch.set_num_threads(args.threads)
    device, dtype = resolve_device_dtype(args)
    torch.manual_seed(args.seed)

    from peft import LoraConfig

    from llm2diff import adapt
    from llm2diff.hardware import describe
    from llm2diff.training.layout import Layout, build_layout
    from llm2diff.training.objective import diffusion_loss

    model, tokenizer, model_desc = load_model_and_tokenizer(args.model, dtype)
    total_params = sum(p.numel() for p in model.parameters())
    lora = None
    if args.lora_r > 0:
        lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear", lora_dropout=0.0)
    dlm = adapt(model, tokenizer, block_size=args.block_size, lora=lora)
    model = dlm.model.to(device)
    model.train()
    mask_id = dlm.config.mask_token_id
    eos_id = int(tokenizer.eos_token_id)
    pad_id = int(tokenizer.pad_token_id)
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)

    prompts, responses = make_batch(args, vocab_rows, mask_id, eos_id)
    example_tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))

    if args.phase == "ar":
        rows = [p + r for p, r in zip(prompts, responses)]
        input_ids = torch.tensor(rows, dtype=torch.long, device=device)  # all rows have the same length: no padding
        attention_mask = torch.ones_like(input_ids)
        labels = input_ids.clone()
        for b, p in enumerate(prompts):
            labels[b, :len(p)] = -100
        shape = tuple(input_ids.shape)

        def loss_fn():
            return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss
    else:
        layout = build_layout(prompts, responses, args.block_size, pad_id, causal_clean=args.ar_loss_weight > 0)
        layout = Layout(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(layout).items()})
        shape = tuple(layout.input_ids.shape)

        def loss_fn():
            loss, _ = diffusion_loss(model, layout, mask_id, t_min=1e-3, t_max=1.0, weighting="elbo",
                                     ar_weight=args.ar_loss_weight)
            return loss

    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        loss = loss_fn()
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        optimizer.step()
        sync()
        t3 = time.perf_counter()
        return float(loss.detach()), (t1 - t0, t2 - t1, t3 - t2, t3 - t0)

    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    base_rss = RssSampler().process.memory_info().rss
    base_maxrss = ru_maxrss_bytes()

    times, losses = [], []
    with RssSampler() as sampler:
        for i in range(args.warmup + args.steps):
            loss, t = step()
            losses.append(loss)
            if i >= args.warmup:
                times.append(t)
    end_maxrss = ru_maxrss_bytes()

    if cuda:
        peak_abs = torch.cuda.max_memory_allocated(device)
        peak_inc = peak_abs - base
        memory_how = "torch.cuda.max_memory_allocated (reset at phase start) minus allocated at phase start"
    else:
        peak_abs = max(sampler.peak, end_maxrss if end_maxrss > base_maxrss else 0)
        peak_inc = peak_abs - base_rss
        malloc = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        memory_how = (f"CPU peak RSS increase over {len(losses)} steps in a fresh child per phase, "
                      f"{'MALLOC_MMAP_THRESHOLD_=' + malloc if malloc else 'default malloc'} "
                      f"(peak = max of psutil 2 ms sampling and ru_maxrss; minus RSS before the first step)")

    def median(k):
        return statistics.median(t[k] for t in times)

    return {
        "phase": args.phase, "model": model_desc, "total_params": total_params, "trainable_params": trainable_params,
        "threads": torch.get_num_threads(), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "shape": shape, "example_tokens": example_tokens, "response_len": len(responses[0]),
        "median_step_s": median(3), "median_forward_s": median(0), "median_backward_s": median(1),
        "median_optimizer_s": median(2), "step_times_s": [t[3] for t in times], "part_times_s": times,
        "tokens_per_s": example_tokens / median(3), "peak_mem_mb": peak_inc / 2**20, "peak_abs_mb": peak_abs / 2**20,
        "base_mb": (base if cuda else base_rss) / 2**20, "memory_how": memory_how, "losses": losses,
        "mask_token": f"{dlm.config.mask_token!r} id {mask_id}", "hardware": describe(device=device),
    }


# -- driver (parent process) -------------------------------------------------------------------------------------
def run_child(args, phase: str, memory_run: bool = False) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--phase", phase] + (["--memory-run"] if memory_run else [])
    for key, value in vars(args).items():
        if key not in ("phase", "memory_run"):
            argv += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if memory_run:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # glibc: mmap (and unmap on free) every block >= 128 KiB
    what = "memory" if memory_run else "timing"
    print(f"[train_step] running phase {phase} ({what}) in a child process ...", file=sys.stderr, flush=True)
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout)
        raise SystemExit(f"phase {phase} failed with exit code {proc.returncode}")
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    raise SystemExit(f"phase {phase} printed no result:\n{proc.stdout}")


def merge_rounds(results: list[dict]) -> dict:
    """One phase's results over several rounds: medians over all timed steps, the largest memory peak."""
    merged = dict(results[0])
    if len(results) == 1:
        return merged
    parts = [t for r in results for t in r["part_times_s"]]
    for k, name in enumerate(("forward", "backward", "optimizer", "step")):
        merged[f"median_{name}_s"] = statistics.median(t[k] for t in parts)
    merged["step_times_s"] = [t[3] for t in parts]
    merged["tokens_per_s"] = merged["example_tokens"] / merged["median_step_s"]
    worst = max(results, key=lambda r: r["peak_mem_mb"])
    for key in ("peak_mem_mb", "peak_abs_mb", "base_mb"):
        merged[key] = worst[key]
    return merged


def report(args, ar: dict, dif: dict) -> None:
    import peft
    import torch
    import transformers

    lora = f"LoRA r={args.lora_r} alpha={2 * args.lora_r} all-linear" if args.lora_r > 0 else "full fine-tune"
    print("== llm2diff train-step benchmark: block diffusion vs AR SFT ==")
    print(f"model        : {ar['model']}")
    print(f"params       : {ar['total_params'] / 1e6:.2f} M total, {ar['trainable_params'] / 1e6:.3f} M trainable "
          f"({lora}); mask token {ar['mask_token']}")
    print(f"device/dtype : {ar['device']} / {ar['dtype']}   threads: {ar['threads']} (torch.set_num_threads)")
    print(f"hardware     : {ar['hardware']}")
    print(f"batch        : {args.batch_size} x (prompt {args.prompt_len} + response {ar['response_len']} incl. eos, "
          f"block {args.block_size});  AR input {tuple(ar['shape'])}, diffusion layout {tuple(dif['shape'])}")
    rounds = f" x {args.rounds} alternating rounds (fresh processes)" if args.rounds > 1 else ""
    if args.ar_loss_weight:
        print(f"diffusion    : clean_attention causal, ar_loss_weight {args.ar_loss_weight} (AR loss in the same forward)")
    print(f"timing       : median of {args.steps} timed steps after {args.warmup} warm-up{rounds}, AdamW lr={args.lr}")
    print(f"versions     : python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"memory       : {ar['memory_how']}")
    print()
    header = f"{'phase':<10} | {'median step s':>13} | {'tokens/s':>10} | {'peak memory MB':>14}"
    print(header)
    print("-" * len(header))
    for r in (ar, dif):
        print(f"{r['phase']:<10} | {r['median_step_s']:>13.4f} | {r['tokens_per_s']:>10.1f} | {r['peak_mem_mb']:>14.1f}")
    print()
    for r in (ar, dif):
        steps = ", ".join(f"{t:.3f}" for t in r["step_times_s"])
        print(f"{r['phase']:<10} median s: forward+loss {r['median_forward_s']:.4f}, backward "
              f"{r['median_backward_s']:.4f}, optimizer {r['median_optimizer_s']:.4f};  timed steps s: [{steps}]")
    for r in (ar, dif):
        timing_run = (f"; timing run (default malloc): +{r['timing_run_peak_mb']:.1f} MB"
                      if "timing_run_peak_mb" in r else "")
        print(f"{r['phase']:<10} memory at phase start {r['base_mb']:.1f} MB, absolute peak {r['peak_abs_mb']:.1f} MB"
              f"{timing_run}")
    print()
    time_ratio = dif["median_step_s"] / ar["median_step_s"]
    mem_ratio = dif["peak_mem_mb"] / ar["peak_mem_mb"] if ar["peak_mem_mb"] > 0 else float("nan")
    print(f"ratio diffusion/AR time: {time_ratio:.2f}x (target <= 2.3x)")
    print(f"ratio diffusion/AR memory: {mem_ratio:.2f}x")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny",
                        help="'tiny' (random Qwen3 from a config), a built-in alias such as smollm2-135m-instruct, "
                             "or a local checkpoint directory")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=64,
                        help="response tokens including the final eos (rounded up to whole blocks)")
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank; 0 = full fine-tune")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run ar, diffusion, ar, diffusion, ... this many times (each a fresh process) and take "
                             "medians over all timed steps; helps on a machine whose load changes")
    parser.add_argument("--cpu-memory", default="separate", choices=("separate", "same"),
                        help="CPU peak memory from a separate child per phase with MALLOC_MMAP_THRESHOLD_ fixed "
                             "(default), or from the timing child's RSS (default malloc, noisier)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--ar-loss-weight", type=float, default=0.0,
                        help="> 0: the diffusion phase reads clean blocks causally and adds this times the AR loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phase", default=None, choices=("ar", "diffusion"),
                        help="internal: run one phase in this process and print its result as JSON")
    parser.add_argument("--memory-run", action="store_true", help="internal: with --phase, 1 warm-up + 1 step")
    args = parser.parse_args(argv)
    if min(args.steps, args.threads, args.batch_size, args.prompt_len, args.response_len, args.block_size,
           args.rounds) < 1 or args.warmup < 0 or args.lora_r < 0:
        parser.error("--steps, --threads, --batch-size, --prompt-len, --response-len, --block-size, --rounds must be "
                     ">= 1; --warmup and --lora-r >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.phase is not None:
        result = run_phase(args)
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return
    runs = {"ar": [], "diffusion": []}
    for _ in range(args.rounds):  # alternate the phases, so a change in machine load hits both
        for phase in runs:
            runs[phase].append(run_child(args, phase))
    results = {phase: merge_rounds(r) for phase, r in runs.items()}
    if results["ar"]["device"] == "cpu" and args.cpu_memory == "separate":
        for phase, result in results.items():
            memory = run_child(args, phase, memory_run=True)
            result["timing_run_peak_mb"] = result["peak_mem_mb"]
            for key in ("peak_mem_mb", "peak_abs_mb", "base_mb", "memory_how"):
                result[key] = memory[key]
    report(args, results["ar"], results["diffusion"])


if __name__ == "__main__":
    main()
