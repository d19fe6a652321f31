"""Test-time training (TTT) for ARC-AGI: fine-tune on one task's own demonstration pairs before decoding its test.

The strongest open ARC solvers (the ARChitects, and Akyurek et al. 2024, "The Surprising Effectiveness of Test-Time
Training for Abstract Reasoning") briefly fine-tune the model on each task before answering it: every demonstration
pair in turn becomes the test, the other pairs its context (leave-one-out), each under the 8 symmetries of the square
times colour permutations. The test output is never seen; the test input is not used either.

    task, settings = ARCAGITask(), TTTSettings(steps=32, max_seconds=60)
    with test_time_trained(dlm, task, row, settings) as record:      # row: one test input of one task
        out = dlm.generate(ids, ...)                                    # decodes with the task's own adapter
    record   # {"steps": 32, "seconds": 41.2, "first_loss": 0.9, "final_loss": 0.31, "rows": 48, ...}
    # here dlm is exactly the model it was before the block

`ttt_rows(task, row, settings)` gives the prompt/completion rows, `ttt_dataset` the same rows pre-tokenized as
training tokenizes them (prompt rendered exactly as evaluation renders it, `PromptRenderer`; response = the output
grid's text + eos). Training is the project's `DiffusionSFTTrainer`, with the model's own block size, token shift,
clean attention, self-conditioning and noise (`dlm.config`), so the TTT loss is the loss the model was trained with.

Adapters (PEFT), `settings.mode`:
  "continue"  (models with a LoRA adapter, the AR twin included) a second adapter "ttt" starts as an exact copy of
              the active adapter (LoRA A/B, the trainable mask-token row, saved modules) and is trained and decoded
              with; on leaving, the original adapter is active again and "ttt" is deleted.
  "fresh"     (models without an adapter: full fine-tunes, merged exports) a new LoRA of rank `lora_r` (PEFT's
              default init, B = 0, so it starts as the model itself) plus the mask-token row; removed on leaving
              (PEFT `unload`). Not offered on top of an existing adapter: PEFT's LoRA layers can sum several active
              adapters, but `PeftModel` (and its trainable-token and saved-module wrappers, and the trainers'
              PEFT handling) assume exactly one; merging the adapter into the base first would change the base
              weights, which the guarantee below forbids.
The guarantee: after the block every tensor of the model is bit for bit what it was (and so are its logits), and so
are the parameters' `requires_grad`, the modules' train/eval modes and attributes (TRL patches `forward` with a
fused LM head and turns `use_cache` off), torch's thread count and the Python/NumPy/torch random states (restored
as soon as training ends, so decoding inside the block draws what it would have drawn); merged-LoRA weights that
`DiffusionLM.lora_merged` builds inside the block are dropped with it.

Cost: `steps` optimizer steps of `batch_size` examples, each a forward and backward pass over prompt + 2 x response
tokens (prompt + response for the AR twin), plus the trainer's set-up (about a second). `max_seconds` bounds the
wall time from entering the block (rows, tokenization, set-up and steps; checked after each step, so at least one
step runs). Rows: demonstrations x 8 x (1 + num_colour_perms) per task, e.g. 3 x 16 = 48.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from llm2diff.names import check_choice
from llm2diff.tasks.arc_agi import all_transforms, augment_row, leave_one_out_rows

logger = logging.getLogger(__name__)

MODES = ("continue", "fresh")
ADAPTER = "ttt"  # the name of the task's adapter while the block runs


@dataclass
class TTTSettings:
    """How one task is test-time trained. `steps=0` turns TTT off (the block then changes nothing)."""

    steps: int = 32                     # optimizer steps per task (0 = off)
    max_seconds: float | None = None    # stop after the step during which this much time has passed since entering
    learning_rate: float = 1e-4
    batch_size: int = 4                 # examples per optimizer step
    lora_r: int = 16                    # rank of the new adapter (mode "fresh" only)
    mode: str = "continue"              # "continue": a copy of the model's adapter; "fresh": a new LoRA (no adapter)
    num_colour_perms: int = 1           # augmentations: 8 symmetries x (own colours + this many permutations)
    leave_one_out: bool = True          # each demonstration as the test, the others as context (else no context)
    seed: int = 0                       # the trainer's seed and the colour permutations'
    max_length: int | None = None       # drop rows longer than this many tokens (None: the model's positions)

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"TTT steps must be an integer >= 0 (0 turns test-time training off), got {self.steps!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"TTT max_seconds must be > 0 or None (no time limit), got {self.max_seconds!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"TTT learning_rate must be > 0, got {self.learning_rate!r}")
        for name in ("batch_size", "lora_r"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TTT {name} must be an integer >= 1, got {value!r}")
        check_choice("TTT mode", self.mode, MODES)
        if self.num_colour_perms < 0:
            raise ValueError(f"TTT num_colour_perms must be >= 0, got {self.num_colour_perms}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"TTT max_length must be >= 2 or None, got {self.max_length}")


# ---------------------------------------------------------------------------------------------- rows
def ttt_examples(row: dict, leave_one_out: bool = True) -> list[dict]:
    """The task's demonstration pairs as examples (rows of the task format), never its test input or output.

    leave_one_out: pair i becomes the test with the other pairs, in order, as context (a task with one pair: that
    pair with no context). Otherwise every pair alone, without context (Akyurek et al.'s "I/O" format)."""
    if not row.get("train"):
        raise ValueError(f"ARC task {row.get('id')} has no demonstration pairs to test-time train on")
    own = {**row, "test_input": None, "test_output": None, "test_index": 0}  # the test stays out of every example
    if leave_one_out:
        return leave_one_out_rows([own])
    return [{**own, "train": [], "test_input": p["input"], "test_output": p["output"]} for p in row["train"]]


def ttt_rows(task, row: dict, settings: TTTSettings) -> list[dict]:
    """Prompt/completion rows (`task.question` / `task.target`, as `training_rows` writes them) from the task's
    demonstrations: example n of `ttt_examples` under each of `all_transforms(num_colour_perms, seed + n)`, in that
    order. demonstrations x 8 x (1 + num_colour_perms) rows."""
    rows = []
    for n, example in enumerate(ttt_examples(row, settings.leave_one_out)):
        for transform in all_transforms(settings.num_colour_perms, settings.seed + n):
            augmented = augment_row(example, transform)
            rows.append({"prompt": task.question(augmented), "completion": task.target(augmented)})
    return rows


def ttt_dataset(dlm, task, row: dict, settings: TTTSettings):
    """`ttt_rows` pre-tokenized for `DiffusionSFTTrainer`: a `datasets.Dataset` of `prompt_ids` / `response_ids`,
    and how many rows were dropped for being longer than `max_length` (default: the model's positions).

    The prompt is rendered exactly as evaluation renders an ARC prompt (`PromptRenderer`: the model's chat template
    and system prompt), the response as training renders it (`render_example`: the grid text + eos)."""
    from datasets import Dataset

    from llm2diff.evaluation.prompts import PromptRenderer
    from llm2diff.training.data import DataArguments, render_example

    render, config = PromptRenderer(dlm), dlm.config
    args = DataArguments(use_chat_template=render.chat, system_prompt=config.system_prompt,
                         prompt_template=config.prompt_template)
    limit = settings.max_length or getattr(dlm.model.config, "max_position_embeddings", None)
    tokenized, dropped, differ = [], 0, 0
    for r in ttt_rows(task, row, settings):
        prompt_ids = render(task, row, [], question=r["prompt"])
        trained_prompt, response_ids = render_example({"question": r["prompt"], "answer": r["completion"]},
                                                      dlm.tokenizer, args)
        differ += trained_prompt != prompt_ids
        if limit is not None and len(prompt_ids) + len(response_ids) > limit:
            dropped += 1
            continue
        tokenized.append({"prompt_ids": prompt_ids, "response_ids": response_ids})
    if differ:
        logger.warning("%d TTT prompts render differently in training and in evaluation; TTT trains on evaluation's",
                       differ)
    if not tokenized:
        raise ValueError(f"every TTT row of ARC task {row.get('id')} is longer than {limit} tokens (prompt + "
                         "response): raise TTTSettings.max_length (up to the model's positions), or skip the task")
    return Dataset.from_list(tokenized), dropped


# ---------------------------------------------------------------------------------------------- the block
class TimeBudget(TrainerCallback):
    """Stops training after the step during which `deadline` (a `time.perf_counter()` value) passed."""

    def __init__(self, deadline: float | None):
        self.deadline = deadline
        self.stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            control.should_training_stop = self.stopped = True
        return control


@contextlib.contextmanager
def test_time_trained(dlm, task, row: dict, settings: TTTSettings | None = None,
                      output_dir: str | None = None) -> Iterator[dict]:
    """Inside the block, `dlm` decodes with an adapter trained on this task's demonstrations; on leaving, the
    model's own adapter is active again, bit for bit as before. Yields a record: `steps` done, `seconds` (training
    included, from entering the block), `first_loss` and `final_loss` (means over the first and last quarter of the
    steps, `loss_summary`), `losses` (every step's), `rows` trained on,
    `rows_dropped` (too long), `stopped_early` (by `max_seconds`) and `mode`.

    `output_dir`: the trainer's working directory (nothing is saved into it); default a temporary directory, removed
    on leaving. With `steps=0` nothing is trained and the model is left as it is.
    """
    settings = settings or TTTSettings()
    start = time.perf_counter()
    record = {"mode": settings.mode, "steps": 0, "seconds": 0.0, "first_loss": None, "final_loss": None, "losses": [],
              "rows": 0, "rows_dropped": 0, "stopped_early": False}
    if settings.steps == 0:
        yield record
        return
    check_model(dlm, settings)
    dataset, record["rows_dropped"] = ttt_dataset(dlm, task, row, settings)
    record["rows"] = len(dataset)
    with contextlib.ExitStack() as stack:
        workdir = output_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="llm2diff-ttt-"))
        stack.enter_context(_own_merged_lora_cache(dlm))
        modes = {module: module.training for module in dlm.model.modules()}  # before the adapter's modules exist
        budget = TimeBudget(None if settings.max_seconds is None else start + settings.max_seconds)
        try:
            with _global_state_kept():  # the adapter's initialisation draws random numbers too
                model = stack.enter_context(_task_adapter(dlm, settings))
                with _attributes_kept(model):
                    trainer = _trainer(dlm, model, dataset, settings, workdir, budget)
                    trainer.train()
        finally:
            _restore_modes(dlm.model, modes)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        record.update(steps=trainer.state.global_step, stopped_early=budget.stopped, **loss_summary(losses),
                      seconds=round(time.perf_counter() - start, 3))
        del trainer, model  # the trainer's optimizer holds the adapter's parameters and their moments
        yield record


test_time_trained.__test__ = False  # a context manager, not a test: pytest collects names starting with "test"


def loss_summary(losses: list[float]) -> dict:
    """`first_loss` and `final_loss`: the mean training loss of the first and of the last quarter of the steps (at
    least one step each); `losses`, every step's. One step's loss says little for a diffusion model: it depends on
    the mask ratio that step drew (0.09 at one step, 1.75 sixteen steps later, on the same task)."""
    if not losses:
        return {"first_loss": None, "final_loss": None, "losses": []}
    quarter = max(1, len(losses) // 4)
    return {"first_loss": sum(losses[:quarter]) / quarter, "final_loss": sum(losses[-quarter:]) / quarter,
            "losses": [round(value, 4) for value in losses]}  # a context manager, not a test: pytest collects names starting with "test"


def check_model(dlm, settings: TTTSettings) -> None:
    """Refuse a model the chosen mode cannot train, saying what to do instead."""
    if settings.mode == "continue" and not dlm.has_adapter:
        raise ValueError("TTT mode 'continue' trains a copy of the model's LoRA adapter, and this model has none "
                         "(full fine-tuning or a merged export): use TTTSettings(mode='fresh'), which trains a new "
                         "LoRA on top of it")
    if settings.mode == "fresh" and dlm.has_adapter:
        raise ValueError("TTT mode 'fresh' adds a new LoRA to a model without an adapter, and this model has one "
                         "(PEFT activates one adapter per model, so a second cannot be stacked on it): use "
                         "TTTSettings(mode='continue'), which trains a copy of the adapter, or export a merged model "
                         "(llm2diff export --merge) and use 'fresh' on that")
    if dlm.has_adapter and ADAPTER in dlm.model.peft_config:
        raise ValueError(f"the model already holds an adapter named {ADAPTER!r}: test_time_trained blocks cannot be "
                         "nested, and the name is reserved for the task's adapter")
    noise = dlm.config.noise_spec
    if noise.order == "semantic":
        raise ValueError("this model was trained with semantic noise (noise_order 'semantic'), which needs "
                         "significance scores for every row; TTT does not score its rows yet")
    if settings.mode == "fresh" and noise.edit_fraction > 0 and noise.edit_source == "parent":
        raise ValueError("this model was trained with edit_source 'parent', which reads the AR parent as the model "
                         "with its LoRA off; with mode 'fresh' that would be the fine-tuned model itself")


def _trainer(dlm, model, dataset, settings: TTTSettings, output_dir: str, budget: TimeBudget):
    """The project's `DiffusionSFTTrainer` set up as the model was trained (block size, shift, attention, noise)."""
    from transformers.trainer_callback import PrinterCallback

    from llm2diff.noise.masking import NoiseSpec
    from llm2diff.training.config import DiffusionSFTConfig
    from llm2diff.training.trainer import DiffusionSFTTrainer

    config, noise = dlm.config, dlm.config.noise_spec
    recipe = (config.training or {}).get("recipe")  # the AR loss term, if the model was trained with one
    ar_loss_weight = recipe.get("ar_loss_weight") if isinstance(recipe, dict) else None
    ar_loss_weight = float(ar_loss_weight or 0.0) if config.causal_clean and config.shift else 0.0
    longest = max(len(r["prompt_ids"]) + 2 * len(r["response_ids"]) for r in dataset)
    args = DiffusionSFTConfig(
        output_dir=output_dir, max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, seed=settings.seed, data_seed=settings.seed, report_to="none",
        save_strategy="no", eval_strategy="no", logging_steps=1, disable_tqdm=True, gradient_checkpointing=False,
        use_cpu=dlm.device.type == "cpu", dataloader_num_workers=0, max_length=max(longest, config.block_size),
        block_size=config.block_size, shift=config.shift, clean_attention=config.clean_attention,
        self_conditioning=config.self_conditioning, ar_loss_weight=ar_loss_weight,
        **{key: getattr(noise, name) for name, key in NoiseSpec.recipe_keys().items()},
    )
    trainer = DiffusionSFTTrainer(model=model, args=args, diffusion_config=config, processing_class=dlm.tokenizer,
                                  train_dataset=dataset, decoding=dlm.decoding, callbacks=[budget])
    trainer.remove_callback(PrinterCallback)  # it prints every step's log line
    return trainer


# ---------------------------------------------------------------------------------------------- adapters
@contextlib.contextmanager
def _task_adapter(dlm, settings: TTTSettings) -> Iterator[torch.nn.Module]:
    """The model to train, with the task's adapter active and the only thing trainable; undone on leaving."""
    flags = {name: p.requires_grad for name, p in dlm.model.named_parameters()}
    try:
        with (_copied_adapter(dlm.model) if settings.mode == "continue" else _fresh_adapter(dlm, settings)) as model:
            yield model
    finally:
        for name, p in dlm.model.named_parameters():
            p.requires_grad_(flags[name])


@contextlib.contextmanager
def _copied_adapter(model) -> Iterator[torch.nn.Module]:
    """A second adapter `ADAPTER`, an exact copy of the active one (same tensors, dtypes, config), set active and
    trainable; the original adapter active again and `ADAPTER` deleted on leaving."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    original = model.active_adapter
    config = copy.deepcopy(model.peft_config[original])
    config.inference_mode = False
    model.add_adapter(ADAPTER, config)
    try:
        weights = get_peft_model_state_dict(model, adapter_name=original, save_embedding_layers=False)
        set_peft_model_state_dict(model, weights, adapter_name=ADAPTER)
        _check_copy(model, original)
        model.set_adapter(ADAPTER)
        yield model
    finally:
        model.set_adapter(original)
        model.delete_adapter(ADAPTER)


def _twin(name: str, original: str) -> str | None:
    """The original adapter's name for a tensor of `ADAPTER` (`...lora_A.ttt.weight` -> `...lora_A.default.weight`),
    None for a tensor that is not the task adapter's."""
    parts = name.split(".")
    return ".".join(original if p == ADAPTER else p for p in parts) if ADAPTER in parts else None


def _check_copy(model, original: str) -> None:
    """Give every tensor of `ADAPTER` its twin's dtype, then check that it equals its twin exactly."""
    params = dict(model.named_parameters())
    for name, param in params.items():
        twin = _twin(name, original)
        if twin in params and param.dtype != params[twin].dtype:  # PEFT creates new adapters in float32
            param.data = param.data.to(params[twin].dtype)
    state = model.state_dict()
    copied = {name: twin for name in state if (twin := _twin(name, original)) is not None}
    wrong = [name for name, twin in copied.items() if twin not in state or not torch.equal(state[name], state[twin])]
    if not copied or wrong:
        raise RuntimeError(f"the TTT adapter is not an exact copy of adapter {original!r} ({len(wrong)} of "
                           f"{len(copied)} tensors differ, e.g. {wrong[:2]}): this PEFT version stores adapters "
                           "differently from what llm2diff expects")


@contextlib.contextmanager
def _fresh_adapter(dlm, settings: TTTSettings) -> Iterator[torch.nn.Module]:
    """A new LoRA `ADAPTER` (rank `lora_r`, the project's LoRA defaults otherwise, PEFT's init: the model unchanged)
    plus the mask-token row, injected into `dlm.model` in place; removed on leaving (PEFT's `unload`). `dlm.model`
    stays the plain model, so `dlm` keeps no free AR parent inside the block, as outside."""
    from peft import get_peft_model

    from llm2diff.training.arguments import ModelArguments

    config = ModelArguments(lora_r=settings.lora_r, lora_alpha=2 * settings.lora_r).lora_config()
    config.trainable_token_indices = {"embed_tokens": [dlm.config.mask_token_id]}
    peft_model = get_peft_model(dlm.model, config, adapter_name=ADAPTER)
    parent, dlm.weights_are_parent = dlm.weights_are_parent, False  # the injected LoRA makes them not the parent's
    try:
        yield peft_model
    finally:
        peft_model.unload()
        dlm.weights_are_parent = parent


@contextlib.contextmanager
def _own_merged_lora_cache(dlm) -> Iterator[None]:
    """Merged-LoRA weights built inside the block (`DiffusionLM.lora_merged`) are the task adapter's: keep them
    apart, and drop them on leaving: the cache tells staleness by tensor addresses and version counters, and fused
    AdamW's steps leave the counters alone, so a later task's adapter at the same addresses would look unchanged.
    The model's own entries come back."""
    saved = dlm.__dict__.pop("_merged_lora_cache", None)
    try:
        yield
    finally:
        dlm.__dict__.pop("_merged_lora_cache", None)
        if saved is not None:
            dlm._merged_lora_cache = saved


@contextlib.contextmanager
def _attributes_kept(model: torch.nn.Module) -> Iterator[None]:
    """Undo what setting up and running the trainer writes on the model's modules and configs: TRL patches the
    model's `forward` with a fused LM head (one more wrapper around `forward` per task, if left) and tags the model,
    accelerate marks it prepared, the config's `use_cache` goes off. Attributes added are removed, replaced ones put
    back; train/eval modes are `_restore_modes`'s."""
    from transformers import PretrainedConfig

    objects = {id(m): m for m in model.modules()}
    objects.update({id(c): c for m in list(objects.values())
                    if isinstance(c := getattr(m, "config", None), PretrainedConfig)})
    saved = {key: (obj, dict(vars(obj))) for key, obj in objects.items()}
    try:
        yield
    finally:
        for obj, attributes in saved.values():
            now = vars(obj)
            for name in [name for name in now if name not in attributes]:
                del now[name]
            for name, value in attributes.items():
                if name != "training" and now.get(name) is not value:
                    now[name] = value


def _restore_modes(model: torch.nn.Module, modes: dict) -> None:
    """Put each module back in the train/eval mode `modes` records; a module made since takes the model's."""
    for module in model.modules():
        module.training = modes.get(module, modes[model])


@contextlib.contextmanager
def _global_state_kept() -> Iterator[None]:
    """Undo what the trainer changes globally: torch's thread count and the Python, NumPy and torch (CPU and CUDA)
    random states (the trainer seeds them all), so decoding after training draws what it would have drawn."""
    import numpy as np

    threads = torch.get_num_threads()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
           torch.cuda.get_rng_state_all() if cuda else None)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])


__all__ = [
    "ADAPTER",
    "MODES",
    "TTTSettings",
    "TimeBudget",
    "test_time_trained",
    "ttt_dataset",
    "ttt_examples",
    "ttt_rows",
]
