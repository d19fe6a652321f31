"""The `llm2diff` command line.

    llm2diff train --config recipes/quickstart.yaml [--learning_rate 1e-4 ...]
    llm2diff generate --model outputs/quickstart --prompt "Tom has 12 apples. ..." [--tokens-per-step 2]
    llm2diff eval --config eval/gsm8k.yaml --model outputs/quickstart [--ar-parent] [--limit 100]
    accelerate launch -m llm2diff train --config recipes/quickstart.yaml

Bad input (unknown recipe keys, missing files, impossible settings) ends with a one-line error, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

USAGE = """usage: llm2diff <command> [options]

commands:
  train      fine-tune a stock causal LM into a block-diffusion LM from a YAML recipe (--config FILE)
  generate   sample from a saved model (--model DIR --prompt TEXT)
  eval       evaluate a saved model or its AR parent on a task (--config eval/gsm8k.yaml --model DIR [--ar-parent])
  star       self-training rounds: sample, verify, rationalize, retrain, evaluate (--config recipes/quickstart-star.yaml)
  prm        label reasoning steps with rollouts, train a process reward model (--config recipes/quickstart-prm.yaml)
  rl         GRPO with outcome and process rewards on a diffusion policy (--config recipes/quickstart-rl.yaml)
  rounds     STaR -> PRM -> RL, round after round (--config recipes/quickstart-rounds.yaml)

run `llm2diff <command> --help` for the options of a command."""


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm2diff generate", description="Sample from a saved block-diffusion model.")
    p.add_argument("--model", required=True, help="directory written by training (or DiffusionLM.save_pretrained)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--tokens-per-step", type=int, default=None, help="default: the model's saved sampler setting")
    p.add_argument("--threshold", type=float, default=None, help="commit every token above this confidence")
    p.add_argument("--commit-rule", choices=("confidence", "coarse_to_fine"), default=None,
                   help="which positions to commit first: the most confident, or (for a model trained with a "
                        "semantic_scorer) the most significant predicted tokens weighed with confidence")
    p.add_argument("--significance-weight", type=float, default=None,
                   help="coarse_to_fine: priority = log(confidence) + weight * significance")
    p.add_argument("--confidence-floor", type=float, default=None,
                   help="do not commit predictions below this confidence (each step still commits one)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string; repeatable")
    p.add_argument("--no-chat-template", action="store_true",
                   help="render the prompt with the model's plain prompt_template instead of the chat template")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--ar-parent", action="store_true", help="also show the AR parent's greedy answer (adapter off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None)
    return p


def cmd_generate(argv: list[str]) -> int:
    args = _generate_parser().parse_args(argv)
    from llm2diff.evaluation.exact_match import left_pad
    from llm2diff.modeling.diffusion_lm import load
    from llm2diff.training.data import DataArguments, render_example

    dlm = load(args.model, device=args.device)
    tok = dlm.tokenizer
    c = dlm.config
    data_args = DataArguments(use_chat_template=c.use_chat_template and not args.no_chat_template,
                              system_prompt=c.system_prompt, prompt_template=c.prompt_template)
    # rendered exactly as the training prompts were (chat template, system prompt, template)
    prompts = [render_example({"question": text, "answer": ""}, tok, data_args)[0] for text in args.prompt]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    out = dlm.generate(
        ids, mask, max_new_tokens=args.max_new_tokens,
        temperature=c.temperature if args.temperature is None else args.temperature, top_k=args.top_k,
        top_p=args.top_p, threshold=c.threshold if args.threshold is None else args.threshold,
        tokens_per_step=c.tokens_per_step if args.tokens_per_step is None else args.tokens_per_step,
        stop_strings=args.stop, use_cache=not args.no_cache, seed=args.seed, commit_rule=args.commit_rule,
        significance_weight=args.significance_weight, confidence_floor=args.confidence_floor,
    )
    parent = dlm.ar_generate(ids, mask, max_new_tokens=args.max_new_tokens) if args.ar_parent else None
    width = ids.shape[1]
    for i, text in enumerate(args.prompt):
        print(f"### prompt {i}: {text}")
        print(tok.decode(out.sequences[i, width:], skip_special_tokens=True).strip())
        if parent is not None:
            print(f"--- AR parent:\n{tok.decode(parent[i, width:], skip_special_tokens=True).strip()}")
    new, row_passes = int(out.num_new_tokens.sum()), int(out.nfe_per_row.sum())
    print(f"\n[{new} new tokens in {len(args.prompt)} rows, {out.nfe} forward passes of the batch, "
          f"{new / max(row_passes, 1):.2f} tokens per forward per row, block size {c.block_size}]")
    return 0


def _require_recipe(argv: list[str], command: str, example: str) -> None:
    if "--config" not in argv and not any(a in ("-h", "--help") for a in argv):
        raise ValueError(f"{command} needs a recipe: llm2diff {command} --config {example}")


def cmd_train(argv: list[str]) -> int:
    from llm2diff.recipe import parse_recipe
    from llm2diff.training.run import run_train

    _require_recipe(argv, "train", "recipes/quickstart.yaml")
    model_args, data_args, train_args, eval_args, recipe = parse_recipe(argv)
    summary = run_train(model_args, data_args, train_args, eval_args, recipe)
    print(f"saved to {summary['output_dir']}")
    return 0


def cmd_star(argv: list[str]) -> int:
    from llm2diff.recipe import parse_recipe
    from llm2diff.star.config import star_dataclasses
    from llm2diff.star.rounds import run_star

    _require_recipe(argv, "star", "recipes/quickstart-star.yaml")
    model_args, data_args, train_args, star_args, recipe = parse_recipe(argv, classes=star_dataclasses())
    records = run_star(model_args, data_args, train_args, star_args, recipe)
    print(f"{len(records) - 1} rounds done; report in {train_args.output_dir}/report.md")
    return 0


def cmd_prm(argv: list[str]) -> int:
    from llm2diff.prm.pipeline import prm_dataclasses, run_prm
    from llm2diff.recipe import parse_recipe

    _require_recipe(argv, "prm", "recipes/quickstart-prm.yaml")
    prm_args, train_args, recipe = parse_recipe(argv, classes=prm_dataclasses())
    run_prm(prm_args, train_args, recipe)
    print(f"process reward model in {train_args.output_dir}/prm; report in {train_args.output_dir}/prm_report.json")
    return 0


def cmd_rl(argv: list[str]) -> int:
    from llm2diff.recipe import parse_recipe
    from llm2diff.rl.pipeline import rl_dataclasses, run_rl

    _require_recipe(argv, "rl", "recipes/quickstart-rl.yaml")
    rl_args, grpo_args, recipe = parse_recipe(argv, classes=rl_dataclasses())
    report = run_rl(rl_args, grpo_args, recipe)
    accuracy = report.get("accuracy")
    print(f"policy saved to {grpo_args.output_dir}/model" + ("" if accuracy is None else f"; held-out accuracy {accuracy:.1%}"))
    return 0


def cmd_rounds(argv: list[str]) -> int:
    from llm2diff.recipe import parse_recipe
    from llm2diff.rl.rounds import rounds_dataclasses, run_rounds

    _require_recipe(argv, "rounds", "recipes/quickstart-rounds.yaml")
    model_args, data_args, train_args, star_args, prm_args, rounds_args, recipe = parse_recipe(
        argv, classes=rounds_dataclasses())
    records = run_rounds(model_args, data_args, train_args, star_args, prm_args, rounds_args, recipe)
    print(f"{len(records) - 1} rounds done; report in {train_args.output_dir}/report.md")
    return 0


def cmd_eval(argv: list[str]) -> int:
    from llm2diff.evaluation.runner import EvalConfig, run_eval, summary_markdown
    from llm2diff.recipe import parse_recipe

    cfg, _ = parse_recipe(argv, classes=(EvalConfig,))
    summary = run_eval(cfg)
    print("\n" + summary_markdown(summary))
    print(f"results in {cfg.resolved_output_dir()}")
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "star": cmd_star, "prm": cmd_prm,
            "rl": cmd_rl, "rounds": cmd_rounds}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"llm2diff: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return command(argv[1:])
    except (ValueError, FileNotFoundError, ImportError) as err:
        if "--debug" in argv or _debug_env():
            raise
        print(f"llm2diff {argv[0]}: error: {err}", file=sys.stderr)
        return 2


def _debug_env() -> bool:
    import os

    return os.environ.get("LLM2DIFF_DEBUG", "") not in ("", "0")


if __name__ == "__main__":
    sys.exit(main())
