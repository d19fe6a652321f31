"""Scale-out: the shipped accelerate configs, two CPU processes training as one job, and QLoRA.

- every `recipes/accelerate/*.yaml` is accepted by accelerate, the sharded ones give the processes the FSDP or
  DeepSpeed plugin they promise, and each header carries a launch command that parses;
- `accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml` runs `llm2diff train` as two processes that
  train on different examples, end the step with identical adapters (gradients were all-reduced) and save one adapter;
- a GPU config on a machine without a GPU, DeepSpeed without deepspeed, and impossible quantization settings fail
  with a message saying what to do;
- `load_in_4bit` / `load_in_8bit` (bitsandbytes) train an adapter on the quantized base, whose AR parent is the
  quantized model; the adapter saves and reloads.

Launched as a script (`accelerate launch ... tests/test_scaleout.py --probe_dir DIR --config RECIPE`), this file is the
probe of the two-process test: it runs `llm2diff train` unchanged, recording what each process trained on and its
trainable weights before and after training into DIR/rank-N.pt.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
EXPECTED_CONFIGS = {"single_device", "multi_gpu_ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "cpu_2proc"}
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
NAMES = ("tom", "ana", "max", "lea", "sam")


# -- the shipped accelerate configs --------------------------------------------------------------------------------
def test_every_expected_accelerate_config_ships():
    assert {p.stem for p in CONFIGS} == EXPECTED_CONFIGS


def _launch_line(path: Path) -> list[str]:
    lines = [line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")]
    launch = [line for line in lines if line.startswith("accelerate launch")]
    assert len(launch) == 1, f"{path.name}: the header must carry exactly one `accelerate launch` command"
    return shlex.split(launch[0])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_is_valid_and_consistent(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    config = ClusterConfig.from_yaml_file(str(path))  # unknown top-level keys fail here
    kind = config.distributed_type
    if kind == DistributedType.NO:
        assert config.num_processes == 1
    elif kind == DistributedType.MULTI_GPU:
        assert config.num_processes >= 2  # accelerate refuses fewer for a multi-process launch
    else:
        assert kind in (DistributedType.FSDP, DistributedType.DEEPSPEED) and config.num_processes >= 1
    assert config.num_machines == 1 and config.mixed_precision == "no"  # precision is the recipe's bf16 key
    assert config.use_cpu == (path.stem == "cpu_2proc")
    assert bool(config.fsdp_config) == (kind == DistributedType.FSDP)
    assert bool(config.deepspeed_config) == (kind == DistributedType.DEEPSPEED)
    # accelerate copies fsdp_config / deepspeed_config keys onto launch options without checking them: a misspelt
    # key would be ignored silently, so check each against the options `accelerate launch` knows
    options = {o for action in launch_command_parser()._actions for o in action.option_strings}
    for key in [*config.fsdp_config, *config.deepspeed_config]:
        assert f"--{key}" in options, f"{path.name}: {key} is not an accelerate launch option"
    if kind == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] == int(path.stem[-1])


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem.startswith(("fsdp", "deepspeed"))],
                         ids=lambda p: p.name)
def test_sharded_config_gives_the_processes_the_intended_plugin(path):
    """Build the FSDP / DeepSpeed plugin from the environment accelerate's launcher hands the processes (no GPU
    needed, nor deepspeed), and check it is what the config's header promises."""
    from unittest import mock

    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "llm2diff", "train"])
    args, defaults, _ = _validate_launch_command(args)
    if path.stem == "fsdp":
        env = prepare_multi_gpu_env(args)
        # FSDP1 picks the GPU that initialises parameters on the other ranks (sync_module_states): pretend there is
        # one, through torch's own device queries (accelerate <1.16 asks torch.cuda, 1.16 torch.accelerator first)
        with contextlib.ExitStack() as patches:
            patches.enter_context(mock.patch.dict(os.environ, env))
            patches.enter_context(mock.patch.object(torch.cuda, "current_device", return_value=0))
            patches.enter_context(mock.patch.object(torch.cuda, "is_available", return_value=True))
            if hasattr(torch, "accelerator"):  # torch>=2.6
                patches.enter_context(mock.patch.object(torch.accelerator, "current_accelerator",
                                                        return_value=torch.device("cuda")))
            plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 1 and plugin.use_orig_params  # frozen base + trainable adapter in one unit
        assert plugin.sharding_strategy.name == "FULL_SHARD" and plugin.state_dict_type.name == "FULL_STATE_DICT"
        assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
        assert plugin.cpu_ram_efficient_loading and plugin.sync_module_states
    else:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
        with mock.patch.dict(os.environ, env):
            plugin = DeepSpeedPlugin()
        stage = int(path.stem[-1])
        zero = plugin.deepspeed_config["zero_optimization"]
        assert plugin.zero_stage == zero["stage"] == stage
        # batch sizes and gradient accumulation come from the recipe (transformers fills "auto")
        assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
        assert plugin.zero3_init_flag == (stage == 3)
        assert zero.get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_header_command_launches_llm2diff_train(path):
    from accelerate.commands.launch import launch_command_parser

    from llm2diff.recipe import valid_keys
    from llm2diff.training.arguments import train_dataclasses

    words = _launch_line(path)
    args = launch_command_parser().parse_args(words[2:])
    assert Path(args.config_file) == path.relative_to(ROOT)
    assert args.module and args.training_script == "llm2diff" and args.training_script_args[0] == "train"
    train_argv = args.training_script_args[1:]
    recipe = train_argv[train_argv.index("--config") + 1]
    assert (ROOT / recipe).is_file()
    keys = [w[2:] for w in train_argv if w.startswith("--") and w != "--config"]
    assert set(keys) <= set(valid_keys(train_dataclasses()))
    # the quickstart recipe says use_cpu: true (it targets a laptop): GPU configs must turn that off
    if path.stem != "single_device":
        expected = "true" if path.stem == "cpu_2proc" else "false"
        assert train_argv[train_argv.index("--use_cpu") + 1] == expected


# -- two processes on the CPU --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny Qwen2 checkpoint and 32 distinct arithmetic problems (each answer differs, so examples are told apart).

    64 wide rather than conftest's 32: bitsandbytes' CPU inference path for 4-bit layers needs in_features >= 64.
    """
    from conftest import MODEL_VOCAB, make_tokenizer
    from transformers import AutoModelForCausalLM, Qwen2Config

    root = tmp_path_factory.mktemp("scaleout")
    config = Qwen2Config(vocab_size=MODEL_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2,
                         pad_token_id=0, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "tiny-qwen2")
    make_tokenizer().save_pretrained(root / "tiny-qwen2")
    rows = [{"question": f"{NAMES[i % 5]} has {i % 10} apples . he buys {i // 10 + 1} more . how many ?",
             "answer": f"{i % 10} + {i // 10 + 1} = {i % 10 + i // 10 + 1}\n#### {i % 10 + i // 10 + 1}"}
            for i in range(32)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _recipe(workdir, name, **overrides):
    fields = {
        "model_name_or_path": str(workdir / "tiny-qwen2"), "dataset_name": str(workdir / "train.jsonl"),
        "block_size": 4, "output_dir": str(workdir / name), "max_steps": 2, "per_device_train_batch_size": 2,
        "learning_rate": 0.01, "lr_scheduler_type": "constant", "logging_steps": 1, "save_steps": 1,
        "report_to": "none", "use_cpu": True, "gradient_checkpointing": False, "use_lora": True, "lora_r": 4,
        "lora_dropout": 0.0, "t_min": 0.3, "loss_weighting": "mean", "seed": 0, "disable_tqdm": True,
        **overrides,
    }
    path = workdir / f"{name}.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items()))
    return str(path)


def _accelerate(config: str, *command: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / config),
           "--main_process_port", "0", *command]  # port 0: a free port, so parallel runs do not collide
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def test_two_cpu_processes_train_as_one_job_and_save_one_adapter(workdir):
    from llm2diff import load

    recipe = _recipe(workdir, "ddp")
    probe = workdir / "probe"
    proc = _accelerate("recipes/accelerate/cpu_2proc.yaml", str(Path(__file__)), "--probe_dir", str(probe),
                       "--config", recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(probe / f"rank-{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and {r["distributed_type"] for r in ranks} == {"MULTI_CPU"}
    # different data: each process trained 2 steps x 2 examples, none of them shared with the other process
    seen = [[key for batch in r["batches"] for key in batch] for r in ranks]
    assert [len(s) for s in seen] == [4, 4] and len(set(seen[0] + seen[1])) == 8
    # gradients synchronised: the same start, then bitwise the same adapter after training on different data
    before, after = ([r[when] for r in ranks] for when in ("before", "after"))
    assert before[0].keys() == after[0].keys() == after[1].keys() and any("lora_B" in n for n in after[0])
    for name in after[0]:
        assert torch.equal(before[0][name], before[1][name]), name
        assert torch.equal(after[0][name], after[1][name]), f"{name} differs between the processes"
    assert any(not torch.equal(before[0][n], after[0][n]) for n in after[0])  # and it did train
    # one copy saved, by the main process: the final adapter and one per checkpoint, no per-process duplicates
    out = workdir / "ddp"
    saved = sorted(str(p.relative_to(out)) for p in out.rglob("*.safetensors"))
    assert saved == ["adapter_model.safetensors", "checkpoint-1/adapter_model.safetensors",
                     "checkpoint-2/adapter_model.safetensors"]
    assert sorted(p.name for p in (out / "checkpoint-2").glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    # and what was saved is the synchronised adapter
    loaded = dict(load(out).model.named_parameters())
    for name, value in after[0].items():
        assert torch.equal(loaded[name].detach(), value), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a GPU config launched on a machine without a GPU")
def test_gpu_config_without_a_gpu_stops_instead_of_training_twice(workdir):
    recipe = _recipe(workdir, "nogpu", use_cpu=False)
    proc = _accelerate("recipes/accelerate/multi_gpu_ddp.yaml", "--num_processes", "2", "-m", "llm2diff", "train",
                       "--config", recipe)
    assert proc.returncode != 0
    assert "accelerate launched 2 processes, but this machine has no CUDA GPU" in proc.stderr
    assert "--use_cpu true" in proc.stderr and "raise RecipeError" not in proc.stderr  # one line, no traceback
    assert not (workdir / "nogpu").exists()


def test_launch_check_passes_joined_processes_and_warns_about_sharding_on_the_cpu(monkeypatch, caplog):
    from types import SimpleNamespace

    from llm2diff.recipe import RecipeError
    from llm2diff.training.run import check_launch

    for name in ("WORLD_SIZE", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    check_launch(SimpleNamespace(world_size=1, use_cpu=False))  # a plain `llm2diff train`
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_launch(SimpleNamespace(world_size=2, use_cpu=True))  # the processes joined into one job
    assert "FSDP" not in caplog.text
    with pytest.raises(RecipeError, match="accelerate launched 2 processes"):
        check_launch(SimpleNamespace(world_size=1, use_cpu=False))
    # accelerate runs an FSDP config on the CPU as plain DDP (checked with fsdp.yaml and 2 CPU processes)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    check_launch(SimpleNamespace(world_size=2, use_cpu=True))
    assert "asks for FSDP, which accelerate does not run on the CPU" in caplog.text


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_deepspeed_config_without_deepspeed_says_what_to_install(workdir):
    proc = _accelerate("recipes/accelerate/deepspeed_zero2.yaml", "--num_processes", "2", "-m", "llm2diff",
                       "train", "--config", _recipe(workdir, "ds"), timeout=120)
    assert proc.returncode != 0 and "DeepSpeed is not installed" in proc.stderr
    assert not (workdir / "ds").exists()


# -- QLoRA ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    ({"load_in_4bit": True, "load_in_8bit": True}, "load_in_4bit and load_in_8bit are both set: choose one"),
    ({"load_in_4bit": True, "use_lora": False}, "set use_lora: true"),
    ({"load_in_8bit": True, "use_lora": False}, "load_in_8bit freezes the base weights"),
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "int4"}, "bnb_4bit_quant_type must be nf4 or fp4"),
    ({"load_in_4bit": True, "bnb_4bit_compute_dtype": "fp8"}, "bnb_4bit_compute_dtype must be"),
])
def test_impossible_quantization_settings_fail_clearly(workdir, capsys, overrides, message):
    from llm2diff.cli import main

    assert main(["train", "--config", _recipe(workdir, "badq", **overrides)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (workdir / "badq").exists()


@pytest.mark.parametrize("flag", ["load_in_4bit", "load_in_8bit"])
def test_quantization_without_bitsandbytes_names_the_extra(workdir, capsys, monkeypatch, flag):
    from llm2diff.cli import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else find_spec(name, *a))
    assert main(["train", "--config", _recipe(workdir, "nobnb", **{flag: True})]) == 2
    err = capsys.readouterr().err
    assert f"{flag} needs bitsandbytes" in err and "pip install 'llm2diff[qlora]'" in err
    assert not (workdir / "nobnb").exists()


def _quantized_base(workdir, flag):
    from transformers import AutoModelForCausalLM

    from llm2diff.training.arguments import ModelArguments

    config = ModelArguments(**{flag: True}).quantization_config()
    return AutoModelForCausalLM.from_pretrained(workdir / "tiny-qwen2", quantization_config=config,
                                                device_map={"": "cpu"}).eval()


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install 'llm2diff[qlora]')")
@pytest.mark.parametrize("flag", ["load_in_4bit", "load_in_8bit"])
def test_qlora_trains_on_the_quantized_base_saves_and_reloads(workdir, monkeypatch, flag):
    import bitsandbytes as bnb
    from peft import PeftModel

    from llm2diff import load
    from llm2diff.cli import main
    from llm2diff.training.trainer import DiffusionSFTTrainer

    trainers = []
    train = DiffusionSFTTrainer.train
    monkeypatch.setattr(DiffusionSFTTrainer, "train", lambda self, *a, **k: trainers.append(self) or train(self, *a, **k))
    name = f"qlora-{flag}"
    assert main(["train", "--config", _recipe(workdir, name, **{flag: True}, max_steps=3, save_steps=3)]) == 0
    out = workdir / name
    model = trainers[0].model.eval()
    quantized = bnb.nn.Linear4bit if flag == "load_in_4bit" else bnb.nn.Linear8bitLt
    assert isinstance(model.base_model.model.model.layers[0].mlp.up_proj.base_layer, quantized)
    losses = [e["loss"] for e in json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
              if "loss" in e]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    # only the adapter is trainable and saved; diffusion_config.json records the quantized base it was trained on
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["adapter_model.safetensors"]
    recorded = json.loads((out / "diffusion_config.json").read_text())["base_model_source"]["quantization"]
    assert recorded["method"] == "bitsandbytes" and recorded[flag] is True

    ids = torch.tensor([[4, 20, 21, 22, 5, 6, 30, 31]])
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        # the AR parent under QLoRA is the quantized base: adapter off, the logits of the quantized checkpoint
        with model.disable_adapter():
            parent = model(input_ids=ids).logits
        assert torch.allclose(parent, _quantized_base(workdir, flag)(input_ids=ids).logits, atol=1e-5)
        # the saved adapter on the quantized base reproduces the trained model exactly, once its weights are in
        # bfloat16 as TRL's SFTTrainer keeps a QLoRA adapter (PEFT reloads them into float32 layers)
        requantized = PeftModel.from_pretrained(_quantized_base(workdir, flag), out).eval()
        for n, p in requantized.named_parameters():
            if "lora_" in n or "trainable_tokens" in n:
                p.data = p.data.to(torch.bfloat16)
        assert torch.equal(requantized(input_ids=ids).logits, trained)
        # `load` re-quantizes the base as recorded and keeps the adapter in its saved dtype: the trained logits
        dlm = load(out)
        assert any(isinstance(m, quantized) for m in dlm.model.modules())
        assert torch.equal(dlm.model(input_ids=ids).logits, trained)
        assert dlm.config.base_model_source["quantization"] == recorded
        # quantize=False puts the adapter on the full-precision base: the logits move by the quantization error
        full = load(out, quantize=False)
        assert not any(isinstance(m, quantized) for m in full.model.modules())
        assert not torch.allclose(full.model(input_ids=ids).logits, trained, atol=1e-3)
        assert "quantization" not in full.config.base_model_source
    assert dlm.generate(ids, max_new_tokens=4).sequences.shape == (1, ids.shape[1] + 4)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install 'llm2diff[qlora]')")
def test_qlora_model_continues_training_on_its_quantized_base(workdir, monkeypatch):
    """What the self-training rounds do with a QLoRA recipe: continue the saved adapter on the 4-bit base."""
    import bitsandbytes as bnb

    from llm2diff import load
    from llm2diff.cli import main
    from llm2diff.recipe import parse_recipe
    from llm2diff.training.arguments import train_dataclasses
    from llm2diff.training.run import run_train
    from llm2diff.training.trainer import DiffusionSFTTrainer

    first = workdir / "qlora-first"
    assert main(["train", "--config", _recipe(workdir, "qlora-first", load_in_4bit=True, max_steps=2)]) == 0
    trainers = []
    train = DiffusionSFTTrainer.train
    monkeypatch.setattr(DiffusionSFTTrainer, "train", lambda self, *a, **k: trainers.append(self) or train(self, *a, **k))
    args = parse_recipe(["--config", _recipe(workdir, "qlora-next", load_in_4bit=True, max_steps=2)],
                        classes=train_dataclasses())
    before = {n: p.detach().float().clone() for n, p in load(first).model.named_parameters() if "lora_B" in n}
    run_train(*args, init_model=str(first))
    model = trainers[0].model
    assert isinstance(model.base_model.model.model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
    after = {n: p.detach().float() for n, p in load(workdir / "qlora-next").model.named_parameters() if "lora_B" in n}
    assert after.keys() == before.keys() and any(not torch.equal(after[n], before[n]) for n in before)
    saved = json.loads((workdir / "qlora-next" / "diffusion_config.json").read_text())["base_model_source"]
    assert saved["quantization"]["load_in_4bit"] is True
    # export merges a QLoRA adapter into the full-precision base and says so
    from llm2diff.export import merge_model

    merged = merge_model(first, workdir / "qlora-merged")
    record = json.loads((merged / "diffusion_config.json").read_text())["base_model_source"]
    assert "quantization" not in record
    assert record["merged_from"]["adapter_trained_on_quantized_base"]["load_in_4bit"] is True
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in load(merged).model.modules())


def test_continuing_a_full_precision_adapter_under_a_4bit_recipe_warns(workdir, caplog):
    if not HAS_BNB:
        pytest.skip("bitsandbytes is not installed")
    from llm2diff.cli import main
    from llm2diff.recipe import parse_recipe
    from llm2diff.training.arguments import train_dataclasses
    from llm2diff.training.run import continue_from

    assert main(["train", "--config", _recipe(workdir, "fp-first", max_steps=1)]) == 0
    model_args, _, train_args, *_ = parse_recipe(["--config", _recipe(workdir, "fp-next", load_in_4bit=True)],
                                                 classes=train_dataclasses())
    with caplog.at_level("WARNING", logger="llm2diff"):
        dlm = continue_from(workdir / "fp-first", model_args, train_args)
    assert "trained on a full-precision base; the recipe continues on a 4-bit base" in caplog.text
    assert dlm.config.base_model_source["quantization"]["load_in_4bit"] is True


# -- the probe, run by `accelerate launch` in test_two_cpu_processes_train_as_one_job_and_save_one_adapter ----------
def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def probe(argv: list[str]) -> int:
    """Run `llm2diff train` (argv after --probe_dir DIR) recording, per process, the batches and weights it had."""
    import hashlib

    from llm2diff.cli import main
    from llm2diff.training.trainer import DiffusionSFTTrainer

    i = argv.index("--probe_dir")
    probe_dir = Path(argv[i + 1])
    argv = argv[:i] + argv[i + 2:]
    record: dict = {"batches": []}
    compute_loss, train = DiffusionSFTTrainer.compute_loss, DiffusionSFTTrainer.train

    def recording_compute_loss(self, model, inputs, *args, **kwargs):
        pad = self.processing_class.pad_token_id
        keys = []
        for row in inputs["input_ids"].tolist():  # the clean tokens of each example (noise is drawn inside)
            while row and row[-1] == pad:
                row.pop()
            keys.append(hashlib.sha1(str(row).encode()).hexdigest()[:12])
        record["batches"].append(keys)
        return compute_loss(self, model, inputs, *args, **kwargs)

    def recording_train(self, *args, **kwargs):
        record["before"] = _trainable(self.model)
        result = train(self, *args, **kwargs)
        record.update(after=_trainable(self.accelerator.unwrap_model(self.model)), world_size=self.args.world_size,
                      distributed_type=self.accelerator.distributed_type.value)
        probe_dir.mkdir(parents=True, exist_ok=True)
        torch.save(record, probe_dir / f"rank-{self.args.process_index}.pt")
        return result

    DiffusionSFTTrainer.compute_loss = recording_compute_loss
    DiffusionSFTTrainer.train = recording_train
    return main(["train", *argv])


if __name__ == "__main__":
    sys.exit(probe(sys.argv[1:]))


def test_loading_a_qlora_adapter_without_bitsandbytes_names_the_extra(tmp_path, monkeypatch):
    from conftest import adapted_with_saved_base

    from llm2diff import load
    from llm2diff.training.arguments import ModelArguments

    dlm = adapted_with_saved_base(tmp_path)
    record = ModelArguments(load_in_4bit=True).quantization_record() if HAS_BNB else {
        "method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    dlm.config.base_model_source = {**dlm.config.base_model_source, "quantization": record}
    dlm.save_pretrained(tmp_path / "qlora")
    dlm.config.base_model_source.pop("quantization")
    dlm.save_pretrained(tmp_path / "dlm")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ImportError, match=r"load_in_4bit needs bitsandbytes.*pip install 'llm2diff\[qlora\]'"):
        load(tmp_path / "qlora")
    assert not load(tmp_path / "qlora", quantize=False).config.base_model_source.get("quantization")
    with pytest.raises(ValueError, match="records none"):
        load(tmp_path / "dlm", quantize=True)
