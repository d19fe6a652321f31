"""`llm2diff generate` and `llm2diff chat`: the commands that decode with a saved model, and the decoding flags they
share (one per `DecodingConfig` setting: commit rule, threshold, sub-blocks, step cap, correction, ...); each one left
out falls back on the model's saved decoding (`decoding_config.json`). `llm2diff.cli` dispatches to them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# decoding settings the command line sets another way: the trajectory (--show-steps, --save-trajectory)
NOT_FLAGS = ("record_trajectory",)
# flag spellings kept from earlier releases, beside the ones made from the setting's name
FLAG_ALIASES = {"use_cache": ["--no-cache"], "stop_strings": ["--stop"]}


def decoding_flags() -> list[tuple[str, list[str], dict]]:
    """(setting, option strings, argparse keywords) for every `DecodingConfig` field: the decoding flags of
    `generate` and `chat`, made from the config itself, so a new setting is a flag without further edits. Every
    flag defaults to None: left out, the model's saved setting (or the library's) applies."""
    import dataclasses
    import typing

    from llm2diff.sampling.config import MODES, DecodingConfig, setting_help
    from llm2diff.sampling.rules import COMMIT_RULES

    hints = typing.get_type_hints(DecodingConfig)
    flags = []
    for f in dataclasses.fields(DecodingConfig):
        if f.name in NOT_FLAGS:
            continue
        kind = hints[f.name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind) if typing.get_args(kind) else kind
        dashed = f.name.replace("_", "-")
        help_text = setting_help(f.name)
        if kind is bool:
            names = [f"--no-{dashed}" if f.default else f"--{dashed}"] + FLAG_ALIASES.get(f.name, [])
            flags.append((f.name, names, {"dest": f.name, "action": "store_const", "const": not f.default,
                                          "default": None, "help": help_text}))
        elif f.name == "stop_strings":
            flags.append((f.name, FLAG_ALIASES[f.name] + [f"--{dashed}"], {
                "dest": f.name, "action": "append", "default": None, "metavar": "TEXT",
                "help": help_text + " Repeatable."}))
        else:
            choices = {"mode": MODES, "commit_rule": COMMIT_RULES}.get(f.name)
            flags.append((f.name, [f"--{dashed}"], {"dest": f.name, "type": base, "choices": choices, "default": None,
                                                    "help": help_text}))
    return flags


def _add_sampler_flags(p: argparse.ArgumentParser) -> None:
    """The decoding flags shared by `generate` and `chat` (one per `DecodingConfig` setting) and the shortcuts."""
    s = p.add_argument_group("decoding (a flag left out: the model's saved setting; docs/sampling.md)")
    for _, names, options in decoding_flags():
        s.add_argument(*names, **options)
    s.add_argument("--no-saved-defaults", action="store_true",
                   help="ignore the decoding saved with the model: a flag left out takes the library default (the "
                        "block sampler, 1 token per step, most confident first, no threshold or correction)")
    s.add_argument("--lossless", action="store_true",
                   help="short for --mode lossless: exactly the AR parent's greedy output, drafted by the diffusion "
                        "model and verified by the parent (without an adapter the parent is loaded from the "
                        "recorded base)")
    s.add_argument("--verified", action="store_true",
                   help="short for --mode verified: exactly the model's own greedy causal decoding, each block "
                        "denoised (--threshold) and checked by the model's causal stream as it is committed (a "
                        "model trained with clean_attention: causal)")


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    """`DiffusionLM.generate` keyword arguments from the decoding flags: the flags given become settings of the
    call (a flag left out keeps the model's saved setting), `--lossless` / `--verified` set the mode, and
    `--no-saved-defaults` starts from the library's defaults instead of the saved ones."""
    from llm2diff.sampling.config import DecodingConfig, settings_for

    if args.lossless and args.verified:
        raise ValueError("--lossless and --verified are two different decodings: choose one")
    mode = "lossless" if args.lossless else "verified" if args.verified else args.mode
    if args.mode is not None and mode != args.mode:
        raise ValueError(f"--mode {args.mode} contradicts --{mode}: give one of them")
    given = {name: getattr(args, name) for name, _, _ in decoding_flags() if getattr(args, name) is not None}
    if mode is not None:
        given["mode"] = mode
    if mode in ("lossless", "verified"):  # the flags a mode would ignore, named as flags
        flag_of = {name: names[0] for name, names, _ in decoding_flags()}
        ignored = [flag_of[name] for name in given if name not in settings_for(mode)]
        if args.no_saved_defaults and mode == "lossless":
            ignored.append("--no-saved-defaults")
        if ignored:
            what = ("returns the AR parent's greedy output" if mode == "lossless" else
                    "denoises with the threshold rule and verifies every token")
            raise ValueError(f"--{mode} {what}, so {', '.join(sorted(ignored))} "
                             f"{'does' if len(ignored) == 1 else 'do'} not apply: leave "
                             f"{'it' if len(ignored) == 1 else 'them'} out")
    return {"decoding": DecodingConfig().to_dict() if args.no_saved_defaults else None, **given}


def _dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


def _warn_slow_dtype(dlm) -> None:
    """Say so (once) when the model now samples in a dtype that is the slow one here (bfloat16 on a CPU without AMX)."""
    from llm2diff.hardware import warn_if_slow_dtype

    warn_if_slow_dtype(dlm.model.dtype, dlm.model.device, hint="--dtype float32")


def _add_device_flags(p: argparse.ArgumentParser) -> None:
    """Where and in what precision the model runs (generate and chat)."""
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="weights dtype to sample in (default: the saved one). On a CPU with AMX (bfloat16 tiles) "
                        "bfloat16 makes a pass over a block cost little more than a one-token pass; without AMX "
                        "bfloat16 runs slower than float32 (a warning says so)")


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm2diff generate", description="Sample from a saved block-diffusion model.")
    p.add_argument("--model", required=True, help="directory written by training (or DiffusionLM.save_pretrained)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    _add_sampler_flags(p)
    p.add_argument("--no-chat-template", action="store_true",
                   help="render the prompt with the model's plain prompt_template instead of the chat template")
    p.add_argument("--ar-parent", action="store_true", help="also show the AR parent's greedy answer (adapter off)")
    _add_device_flags(p)
    shown = p.add_argument_group("showing the decoding")
    shown.add_argument("--stream", action="store_true", help="print each block as soon as it is finished (one prompt)")
    shown.add_argument("--show-steps", action="store_true",
                       help="replay the denoising step by step after each answer, then the answer with every token "
                            "coloured by (with --no-color: followed by) the step that committed it")
    shown.add_argument("--no-color", action="store_true", help="--show-steps without terminal colours")
    shown.add_argument("--save-trajectory", metavar="PATH", default=None,
                       help="save the denoising trajectory as .html (interactive page), .gif (animation), .png "
                            "(final canvas) or .json (every step, all prompts in one file); with several prompts "
                            "PATH gets -0, -1, ... before the suffix")
    return p


def _check_generate_args(args: argparse.Namespace) -> None:
    """Refuse impossible combinations before the model is loaded."""
    if args.stream and len(args.prompt) > 1:
        raise ValueError(f"--stream prints one answer as it is decoded: give one --prompt (got {len(args.prompt)})")
    if args.mode == "lossless":
        args.lossless = True
    if args.mode == "verified":
        args.verified = True
    if args.lossless and (args.stream or args.show_steps or args.save_trajectory):
        raise ValueError("--lossless decodes with the AR parent's verification, not by denoising steps: it cannot "
                         "--stream, --show-steps or --save-trajectory")
    if args.verified and (args.lossless or args.show_steps or args.save_trajectory):
        raise ValueError("--verified is its own decoding (denoise, then verify with the causal stream): it cannot "
                         "be combined with --lossless, --show-steps or --save-trajectory")
    if args.save_trajectory is not None:
        from llm2diff.sampling.trajectory_render import SUPPORTED_SUFFIXES

        from llm2diff.rundir import check_writable

        check_writable(Path(args.save_trajectory).parent, "--save-trajectory location")  # before generating
        suffix = Path(args.save_trajectory).suffix.lower()
        if suffix not in SUPPORTED_SUFFIXES:
            raise ValueError(f"--save-trajectory {args.save_trajectory}: cannot save a trajectory as "
                             f"{suffix or 'a file without suffix'!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}")
        if suffix in (".gif", ".png"):
            import importlib.util

            if importlib.util.find_spec("PIL") is None:
                raise ImportError(f"--save-trajectory {args.save_trajectory} needs Pillow: pip install Pillow "
                                  f"(or save as .html or .json)")


def _trajectory_paths(path: str, rows: int) -> list[Path]:
    """Where each prompt's trajectory goes: PATH itself for one prompt (or a .json, which holds every row),
    otherwise PATH with -0, -1, ... before the suffix."""
    path = Path(path)
    if rows == 1 or path.suffix.lower() == ".json":
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(rows)]


def cmd_generate(argv: list[str]) -> int:
    args = _generate_parser().parse_args(argv)
    sampling = _sampling_kwargs(args)
    _check_generate_args(args)
    from llm2diff.chat import BlockPrinter
    from llm2diff.evaluation.completions import left_pad
    from llm2diff.modeling.loading import load
    from llm2diff.training.arguments import DataArguments
    from llm2diff.training.data import render_example

    dlm = load(args.model, device=args.device, dtype=_dtype(args.dtype))
    _warn_slow_dtype(dlm)
    tok = dlm.tokenizer
    c = dlm.config
    data_args = DataArguments(use_chat_template=c.use_chat_template and not args.no_chat_template,
                              system_prompt=c.system_prompt, prompt_template=c.prompt_template)
    # rendered exactly as the training prompts were (chat template, system prompt, template)
    prompts = [render_example({"question": text, "answer": ""}, tok, data_args)[0] for text in args.prompt]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    width = ids.shape[1]
    if args.stream:
        print(f"### prompt 0: {args.prompt[0]}", flush=True)
    out = dlm.generate(ids, mask, streamer=BlockPrinter(tok) if args.stream else None,
                       record_trajectory=args.show_steps or args.save_trajectory is not None, **sampling)
    parent = dlm.ar_generate(ids, mask, max_new_tokens=out.decoding.max_new_tokens) if args.ar_parent else None

    def kept(i: int) -> list[int]:  # the row's generated tokens, end-of-sequence included, no padding
        return out.sequences[i, width: width + int(out.num_new_tokens[i])].tolist()

    for i, text in enumerate(args.prompt):
        if not args.stream:  # streamed: already printed
            print(f"### prompt {i}: {text}")
            print(tok.decode(kept(i), skip_special_tokens=True).strip())
        if parent is not None:
            print(f"--- AR parent:\n{tok.decode(parent[i, width:], skip_special_tokens=True).strip()}")
        if args.show_steps:
            _show_steps(out.trajectory, tok, i, kept(i), color=not args.no_color)
    new = int(out.num_new_tokens.sum())
    if out.mode == "lossless":
        print(f"\n[{new} new tokens in {len(args.prompt)} rows, lossless: {out.mean_accepted_length:.2f} draft "
              f"tokens accepted per verification, {out.nfe_draft} draft + {out.nfe_verify} verify forward passes"
              f"{f' ({out.parent_steps} of them the parent alone)' if out.parent_steps else ''}, "
              f"block size {c.block_size}]")
    elif out.mode == "verified":  # asked for, or the model's saved mode
        print(f"\n[{new} new tokens in {len(args.prompt)} rows, verified: {out.nfe} forward passes, "
              f"{out.acceptance_rate:.0%} of denoised tokens kept, block size {c.block_size}]")
    else:
        row_passes = int(out.nfe_per_row.sum())
        stats = out.stats or {}
        corrections = ", ".join(f"{stats[key]} {word}" for key, word in (
            ("remasked", "remasked"), ("edited", "edited"), ("reopened", "replaced in reopened blocks"))
            if stats.get(key))
        print(f"\n[{new} new tokens in {len(args.prompt)} rows, {out.nfe} forward passes of the batch, "
              f"{new / max(row_passes, 1):.2f} tokens per forward per row, block size {c.block_size}"
              f"{f'; corrections: {corrections}' if corrections else ''}]")
    if args.save_trajectory is not None:
        from llm2diff.sampling.trajectory_render import save_trajectory

        for i, path in enumerate(_trajectory_paths(args.save_trajectory, len(args.prompt))):
            save_trajectory(out.trajectory, tok, path, row=i, final_tokens=kept(i))
            print(f"[trajectory {'of every prompt' if path.suffix.lower() == '.json' else f'of prompt {i}'} "
                  f"saved to {path}]")
    return 0


def _show_steps(trajectory, tokenizer, row: int, final_tokens: list[int], color: bool) -> None:
    """Replay how `row` was denoised (a frame per step), then its tokens by the step that committed them."""
    from llm2diff.sampling.trajectory_render import render_terminal, replay_terminal

    print("--- denoising, step by step:", flush=True)
    replay_terminal(trajectory, tokenizer, row=row, stream=sys.stdout, final_tokens=final_tokens, color=color)
    print("--- each token and the step that committed it:")
    print(render_terminal(trajectory, tokenizer, row=row, color=color, final_tokens=final_tokens))


def _chat_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llm2diff chat", description="Chat with a saved block-diffusion model in the terminal, each reply "
        "printed block by block. Commands: /reset (forget the conversation), /help, /exit (or Ctrl-D).")
    p.add_argument("--model", required=True, help="directory written by training (or DiffusionLM.save_pretrained)")
    p.add_argument("--system", default=None, help="system prompt (default: the model's saved one; '' for none)")
    p.add_argument("--no-stream", action="store_true", help="print each reply whole, once it is finished")
    _add_device_flags(p)
    _add_sampler_flags(p)
    return p


def cmd_chat(argv: list[str]) -> int:
    args = _chat_parser().parse_args(argv)
    sampling = _sampling_kwargs(args)
    from llm2diff.chat import run_chat
    from llm2diff.modeling.loading import load

    dlm = load(args.model, device=args.device, dtype=_dtype(args.dtype))
    _warn_slow_dtype(dlm)
    # a terminal is read with line editing (input()); piped input line by line
    input_stream = None if sys.stdin.isatty() else sys.stdin
    max_new_tokens = sampling.pop("max_new_tokens", None) or dlm.decoding.max_new_tokens
    return run_chat(dlm, input_stream, sys.stdout, max_new_tokens=max_new_tokens, system_prompt=args.system,
                    sampling=sampling, stream=not args.no_stream)
