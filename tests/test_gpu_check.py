"""`benchmarks/gpu_check.sh` and the random-model benchmark it runs: on a machine without a CUDA GPU the script
says so and exits 0 at once; `benchmarks/random_model.py` runs every decoding row and writes its JSON rows (with the
hardware line) on the CPU, so a GPU machine's scarce minutes are not spent on a broken script."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs the whole check")


def run_script(env_extra: dict[str, str] | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@no_gpu
def test_without_a_gpu_it_says_so_and_exits_0():
    done = run_script()
    assert done.returncode == 0, done.stderr
    assert "gpu_check: no CUDA GPU on this machine" in done.stdout
    assert "nothing to check" in done.stdout


@no_gpu
def test_an_nvidia_smi_that_lists_no_gpu_counts_as_none(tmp_path):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    fake.chmod(0o755)
    done = run_script({"PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    assert "gpu_check: no CUDA GPU on this machine (nvidia-smi lists none): nothing to check." in done.stdout


def load_random_model():
    return load_benchmark("random_model")


def test_random_model_generation_rows_run_on_the_cpu(tmp_path, capsys):
    random_model = load_random_model()
    out = tmp_path / "rows.json"
    code = random_model.main(["generation", "--shape", "tiny", "--device", "cpu", "--new-tokens", "16",
                              "--repeats", "1", "--attn", "sdpa,flash_attention_2", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    rows = json.loads(out.read_text())
    assert [r["row"] for r in rows] == ["AR parent (greedy generate)", *random_model.ROWS]
    assert all("error" not in r and r["hardware"].startswith("hardware: ") for r in rows)
    assert all(r["tokens_per_s"] > 0 for r in rows)
    lossless = rows[-1]
    assert isinstance(lossless["identical_to_parent"], bool)
    assert "[generation] flash_attention_2 skipped: it needs a CUDA GPU" in printed
    assert "| attention | decoding | tokens/s | ratio to AR parent | passes/token | note |" in printed


def test_random_model_passes_table_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "passes.json"
    code = load_random_model().main(["passes", "--shape", "tiny", "--device", "cpu", "--positions", "1,8",
                                     "--repeats", "1", "--warmup", "0", "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [r["positions"] for r in rows] == [1, 8]
    assert all(r["float32_ms"] > 0 and r["bfloat16_ms"] > 0 for r in rows)
    assert "| new positions in the pass | float32 ms | bfloat16 ms | bfloat16 / float32 |" in capsys.readouterr().out


@pytest.mark.slow
def test_dry_run_on_the_cpu_goes_through_every_step(tmp_path):
    done = run_script({"GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_LOGS": str(tmp_path), "OMP_NUM_THREADS": "1"},
                      timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout.split("== llm2diff GPU check ==", 1)[1]
    for check in ("| pytest -m gpu", "| generation rows (tiny, float32, batch 1) | ok", "|   sdpa: lossless |",
                  "| pass cost (float32, bfloat16) | ok", "|   pass over 8 new positions |",
                  "| static cache + torch.compile | skipped: dry run |"):
        assert check in table
