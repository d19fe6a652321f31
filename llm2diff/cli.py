"""The `llm2diff` command line.

    llm2diff train --config recipes/quickstart.yaml [--learning_rate 1e-4 ...]
    llm2diff generate --model outputs/quickstart --prompt "Tom has 12 apples. ..." [--tokens-per-step 2]
    llm2diff generate --model outputs/quickstart --prompt "..." --stream            # each block as it is finished
    llm2diff generate --model outputs/quickstart --prompt "..." --show-steps [--save-trajectory out/steps.html]
    llm2diff generate --model outputs/quickstart --prompt "..." --lossless          # the AR parent's greedy output
    llm2diff chat --model outputs/quickstart [--system TEXT] [--max-new-tokens 256]
    llm2diff eval --config eval/gsm8k.yaml --model outputs/quickstart [--ar-parent] [--limit 100]
    llm2diff push outputs/quickstart --repo-id user/arith-dlm [--private]     # to the Hugging Face Hub, with a card
    llm2diff export outputs/quickstart --merge --out outputs/quickstart-merged # adapter merged: a full model
    accelerate launch -m llm2diff train --config recipes/quickstart.yaml

`generate` and `chat` (their decoding flags included) are in `llm2diff.cli_decode`; the recipe commands, push, export
and the dispatch are here.
Bad input (unknown recipe keys, missing files, impossible settings) ends with a one-line error, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from llm2diff.cli_decode import cmd_chat, cmd_generate

USAGE = """usage: llm2diff <command> [options]

commands:
  train      fine-tune a stock causal LM into a block-diffusion LM from a YAML recipe (--config FILE)
  generate   sample from a saved model (--model DIR --prompt TEXT [--stream] [--show-steps] [--lossless])
  chat       talk with a saved model in the terminal, replies printed block by block (--model DIR)
  eval       evaluate a saved model or its AR parent on a task (--config eval/gsm8k.yaml --model DIR [--ar-parent])
  star       self-training rounds: sample, verify, rationalize, retrain, evaluate (--config recipes/quickstart-star.yaml)
  prm        label reasoning steps with rollouts, train a process reward model (--config recipes/quickstart-prm.yaml)
  rl         GRPO with outcome and process rewards on a diffusion policy (--config recipes/quickstart-rl.yaml)
  rounds     STaR -> PRM -> RL, round after round (--config recipes/quickstart-rounds.yaml)
  push       upload a saved model with a generated model card to the Hugging Face Hub (DIR --repo-id OWNER/NAME)
  export     write a standalone model with the LoRA adapter merged in (DIR --merge --out DIR2)

run `llm2diff <command> --help` for the options of a command."""

def _require_recipe(argv: list[str], command: str, example: str) -> None:
    if "--config" not in argv and not any(a in ("-h", "--help") for a in argv):
        raise ValueError(f"{command} needs a recipe: llm2diff {command} --config {example}")


def cmd_train(argv: list[str]) -> int:
    from llm2diff.recipe import parse_recipe
    from llm2diff.training.arguments import train_dataclasses
    from llm2diff.training.run import run_train

    _require_recipe(argv, "train", "recipes/quickstart.yaml")
    model_args, data_args, train_args, eval_args, recipe = parse_recipe(argv, classes=train_dataclasses())
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
    from llm2diff.arc.solve import ARCSolverArguments
    from llm2diff.evaluation.runner import EvalConfig, run_eval, summary_markdown
    from llm2diff.recipe import parse_recipe

    cfg, solver, _ = parse_recipe(argv, classes=(EvalConfig, ARCSolverArguments))
    summary = run_eval(cfg, solver)
    print("\n" + summary_markdown(summary))
    print(f"results in {cfg.resolved_output_dir()}")
    return 0


def _push_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llm2diff push", description="Upload a saved llm2diff model (adapter or full weights, tokenizer, "
        "diffusion_config.json) with a generated model card to the Hugging Face Hub, in one commit. Checkpoints, "
        "optimizer states and training_args.bin stay behind.")
    p.add_argument("model", help="directory written by training (or DiffusionLM.save_pretrained)")
    p.add_argument("--repo-id", required=True, help="the Hub repository, owner/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", default=None,
                   help="a Hub token with write access (default: HF_TOKEN or the login of `hf auth login`)")
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing; default: main)")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--base-model", default=None, metavar="OWNER/NAME",
                   help="record this Hub id as the base model (when training loaded the base from a local copy)")
    return p


def cmd_push(argv: list[str]) -> int:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from llm2diff.hub import push_to_hub

    args = _push_parser().parse_args(argv)
    try:
        info = push_to_hub(args.model, args.repo_id, private=args.private, token=args.token, revision=args.revision,
                           commit_message=args.commit_message, base_model=args.base_model)
    except HfHubHTTPError as err:  # refused by the Hub: no write access, bad token, name taken by another type, ...
        print(f"llm2diff push: error: the Hub refused the upload to {args.repo_id}: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - offline, no network, DNS, timeouts; anything else goes on up
        if not _network_error(err):
            raise
        offline = isinstance(err, OfflineModeIsEnabled)
        print(f"llm2diff push: error: cannot reach the Hugging Face Hub to upload {args.model} to {args.repo_id} "
              f"({'HF_HUB_OFFLINE is set' if offline else error_line(err)}); nothing was uploaded: "
              f"{'unset HF_HUB_OFFLINE and ' if offline else ''}push again when online", file=sys.stderr)
        return 1
    print(f"pushed {args.model} to {getattr(info, 'commit_url', None) or args.repo_id}")
    return 0


def _network_error(err: BaseException) -> bool:
    """Whether `err` says the Hub could not be reached (offline mode, connection, DNS, timeout)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    package = type(err).__module__.split(".")[0]
    return isinstance(err, (OfflineModeIsEnabled, ConnectionError, TimeoutError)) or \
        package in ("httpx", "httpcore", "requests", "urllib3")


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llm2diff export", description="Write a standalone model: the LoRA adapter merged into the base "
        "weights (config.json + model.safetensors), with the tokenizer and diffusion_config.json; `load` reads it "
        "without PEFT and gives the same logits.")
    p.add_argument("model", help="directory of a saved model with a LoRA adapter (or a Hub id owner/name)")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the weights (required)")
    p.add_argument("--out", required=True, help="directory to write the merged model to")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="weights dtype of the merged model (default: the base checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def cmd_export(argv: list[str]) -> int:
    args = _export_parser().parse_args(argv)
    if not args.merge:
        raise ValueError("export writes a merged model only: add --merge")
    from llm2diff.export import merge_model

    out = merge_model(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged model saved to {out}")
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "chat": cmd_chat, "eval": cmd_eval, "star": cmd_star,
            "prm": cmd_prm, "rl": cmd_rl, "rounds": cmd_rounds, "push": cmd_push, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    """Run one command. Errors end in one line on stderr (exit 2 for input the command cannot use, 1 for anything
    else); `--debug` anywhere on the command line, or LLM2DIFF_DEBUG=1, shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or _debug_env()
    argv = [a for a in argv if a != "--debug"]
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
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\nllm2diff {argv[0]}: interrupted; what was finished is kept, and the same command resumes from it",
              file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the user gets one line; --debug shows the traceback
        if debug:
            raise
        print(f"llm2diff {argv[0]}: error: {error_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, (ValueError, FileNotFoundError, ImportError, PermissionError)) else 1


def error_line(err: BaseException) -> str:
    """What went wrong, in one line: the message of an error meant for the user, else the error's type and
    message with a pointer to the traceback."""
    if isinstance(err, PermissionError) and err.filename:
        return (f"cannot write {err.filename} ({err.strerror}): choose a location you can write to (output_dir, "
                "--out, --save-trajectory)")
    message = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (ValueError, FileNotFoundError, ImportError)):
        return message
    if isinstance(err, OSError):
        return f"{message} ({type(err).__name__})"
    return f"{type(err).__name__}: {message} (run again with --debug, or LLM2DIFF_DEBUG=1, for the traceback)"


def _debug_env() -> bool:
    import os

    return os.environ.get("LLM2DIFF_DEBUG", "") not in ("", "0")


if __name__ == "__main__":
    sys.exit(main())
