"""Sharing on the Hub, offline: `llm2diff push` sends exactly the model's files and a card in one commit (the HTTP
boundary, `HfApi.create_repo`/`create_branch`/`create_commit`, is faked), the token never shows, and
`load("owner/name")` (with `snapshot_download` faked) reproduces the saved model's logits; bad input fails clearly."""

from __future__ import annotations

import fnmatch
import json
import logging
import re
import runpy
import shutil
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
import yaml
from conftest import adapted_with_saved_base, make_tokenizer
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from llm2diff import load
from llm2diff.cli import main
from llm2diff.hub import DOWNLOAD_PATTERNS, looks_like_repo_id

TOKEN = "hf_SecretTestToken1234567890abcdef"
REPO = "alice/tiny-dlm"
MODEL_FILES = ["adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "decoding_config.json",
               "diffusion_config.json", "final_eval.json", "tokenizer.json", "tokenizer_config.json"]
FINAL_EVAL = {"results": [{"name": "diffusion (block 4, 1/step)", "accuracy": 0.82, "correct": 82, "total": 100,
                           "tokens_per_forward": 0.767},
                          {"name": "AR parent (greedy generate)", "accuracy": 0.18, "correct": 18, "total": 100,
                           "tokens_per_forward": 1.0}]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A LoRA-adapted tiny Qwen3 saved as a training run leaves it: checkpoints, pickles and a final_eval.json."""
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("hub")
    dlm = adapted_with_saved_base(root, lora=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
                                  system_prompt="Solve the problem step by step.")
    with torch.no_grad():  # a trained-looking mask-token row
        for name, param in dlm.model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(torch.randn_like(param))
    recipe = {"model_name_or_path": str(root / "base"), "dataset_name": "builtin:arithmetic", "lora_r": 4,
              "max_steps": 7, "learning_rate": 0.001, "seed": 3, "block_size": 4, "hub_token": "hf_OldRecipeToken99"}
    dlm.config.training = {"recipe": recipe, "seed": 3, "command": "llm2diff train --config x.yaml --hub_token "
                           "hf_OldCommandToken77", "started": "2026-11-22T03:45:37+0000"}
    dlm.decoding = dlm.decoding.replace(threshold=0.9)
    dlm.save_pretrained(root / "dlm")
    out = root / "dlm"
    (out / "final_eval.json").write_text(json.dumps({**FINAL_EVAL, "diffusion_config": dlm.config.to_dict()}))
    (out / "checkpoint-5").mkdir()
    (out / "checkpoint-5" / "adapter_model.safetensors").write_bytes(b"old")
    (out / "checkpoint-5" / "optimizer.pt").write_bytes(b"pickle")
    (out / "training_args.bin").write_bytes(b"pickle")
    (out / "optimizer.pt").write_bytes(b"pickle")
    return out


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Fake Hub: records create_repo / create_branch / create_commit (with every uploaded file's bytes)."""
    calls = SimpleNamespace(repos=[], branches=[], commits=[])
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored login

    def create_repo(self, repo_id, **kwargs):
        calls.repos.append({"repo_id": repo_id, "token": self.token, **kwargs})
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        calls.branches.append({"repo_id": repo_id, **kwargs})

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            with op.as_file() as f:
                files[op.path_in_repo] = f.read()
        calls.commits.append({"repo_id": repo_id, "files": files, "token": self.token, **kwargs})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc123")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    return calls


def push(capsys, *argv):
    code = main(["push", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def card_metadata(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_push_sends_the_model_files_and_a_card_in_one_commit(model_dir, hub, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    code, out, err = push(capsys, model_dir, "--repo-id", REPO, "--private", "--token", TOKEN)
    assert code == 0, err
    assert hub.repos == [{"repo_id": REPO, "token": TOKEN, "private": True, "exist_ok": True}]
    assert hub.branches == []
    [commit] = hub.commits
    assert commit["repo_id"] == REPO and commit["token"] == TOKEN and commit["revision"] is None
    assert commit["commit_message"] == "Upload llm2diff model"
    assert sorted(commit["files"]) == sorted(MODEL_FILES + ["README.md"])  # no checkpoints, pickles or old card
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json"):
        assert commit["files"][name] == (model_dir / name).read_bytes()
    assert "abc123" in out
    # the token goes to huggingface_hub only: not printed, not logged, not in any file sent
    assert TOKEN not in out + err + caplog.text
    for name, data in commit["files"].items():
        assert TOKEN.encode() not in data, name
    # the base was a local path: the user is told others cannot load it
    assert "not a Hub id" in caplog.text


def test_card_describes_the_model(model_dir, hub, capsys):
    assert push(capsys, model_dir, "--repo-id", REPO, "--base-model", "Qwen/Qwen3-0.6B")[0] == 0
    files = hub.commits[0]["files"]
    card = files["README.md"].decode()
    meta = card_metadata(card)
    assert meta["base_model"] == "Qwen/Qwen3-0.6B" and meta["library_name"] == "peft"
    assert meta["tags"] == ["llm2diff", "block-diffusion", "diffusion-lm", "lora"]
    assert meta["pipeline_tag"] == "text-generation"
    config = json.loads(files["diffusion_config.json"])
    assert config["base_model_name_or_path"] == "Qwen/Qwen3-0.6B"  # what `load` of the repo will fetch
    assert config["block_size"] == 4
    assert "| block size | 4 |" in card
    assert f"`{config['mask_token']}` (id {config['mask_token_id']})" in card
    assert "| token shift | yes" in card and "| threshold | `0.9` |" in card and "| mode | `block` |" in card
    assert "## Decoding" in card and "| temperature |" not in card  # only what differs from the library defaults
    assert "builtin:arithmetic" in card and "| seed | `3` |" in card and "| lora_r | `4` |" in card
    assert "Solve the problem step by step." in card
    assert "transformers" in card.split("Library versions:")[1]
    assert f'dlm = load("{REPO}")' in card and f"llm2diff generate --model {REPO}" in card
    assert f"llm2diff chat --model {REPO}" in card
    # evaluation from final_eval.json
    assert "## Evaluation" in card and "| diffusion (block 4, 1/step) |" in card and "82.0%" in card
    assert "18.0%" in card
    # credentials recorded by training are blanked out in the card and in the files sent
    for data in [card.encode(), *files.values()]:
        assert b"hf_OldRecipeToken99" not in data and b"hf_OldCommandToken77" not in data
    assert config["training"]["recipe"]["hub_token"] == "<redacted>"
    assert json.loads(files["final_eval.json"])["diffusion_config"]["training"]["recipe"]["hub_token"] == "<redacted>"


def test_card_with_a_local_base_and_eval_summaries(model_dir, hub, capsys, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain, ignore=shutil.ignore_patterns("final_eval.json"))
    assert push(capsys, plain, "--repo-id", REPO)[0] == 0
    assert hub.repos[0]["private"] is None  # the Hub's default visibility
    files = hub.commits[0]["files"]
    card = files["README.md"].decode()
    assert "final_eval.json" not in files and "## Evaluation" not in card
    assert "base_model" not in card_metadata(card)  # a local path is no Hub id
    assert "recorded as the local path" in card
    # an `llm2diff eval` summary written inside the model directory is quoted, not uploaded
    summary = {"evaluated": "diffusion (block 4)", "task": "gsm8k", "split": "test", "num_examples": 50,
               "metrics": {"accuracy": 0.36}, "nfe_per_token": 0.5}
    (plain / "eval" / "gsm8k-test").mkdir(parents=True)
    (plain / "eval" / "gsm8k-test" / "summary.json").write_text(json.dumps(summary))
    assert push(capsys, plain, "--repo-id", REPO)[0] == 0
    files = hub.commits[1]["files"]
    assert "| diffusion (block 4) | gsm8k (test) | 36.0% | 50 | 2.0 |" in files["README.md"].decode()
    assert sorted(files) == sorted(set(MODEL_FILES) - {"final_eval.json"} | {"README.md"})


def test_card_usage_snippet_runs(model_dir, hub, capsys, monkeypatch, tmp_path):
    assert push(capsys, model_dir, "--repo-id", REPO)[0] == 0
    card = hub.commits[0]["files"]["README.md"].decode()
    snippet = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    script = tmp_path / "usage.py"
    script.write_text(snippet.replace("max_new_tokens=128", "max_new_tokens=8"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(model_dir))
    runpy.run_path(str(script))
    assert capsys.readouterr().out.strip()


def test_revision_and_commit_message(model_dir, hub, capsys):
    assert push(capsys, model_dir, "--repo-id", REPO, "--revision", "dev", "--commit-message", "round 2")[0] == 0
    assert hub.branches == [{"repo_id": REPO, "branch": "dev", "exist_ok": True}]
    assert hub.commits[0]["revision"] == "dev" and hub.commits[0]["commit_message"] == "round 2"


def test_load_from_the_hub_reproduces_logits(model_dir, monkeypatch, tmp_path):
    snapshot = tmp_path / "snapshot"
    shutil.copytree(model_dir, snapshot, ignore=shutil.ignore_patterns("checkpoint-*", "*.bin", "*.pt"))
    seen = []

    def snapshot_download(repo_id, **kwargs):
        seen.append({"repo_id": repo_id, **kwargs})
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    remote = load(REPO, revision="v1")
    [call] = seen
    assert call["repo_id"] == REPO and call["revision"] == "v1" and call["allow_patterns"] == DOWNLOAD_PATTERNS
    local = load(model_dir)
    assert remote.has_adapter and remote.config == local.config
    ids = torch.tensor([[5, 6, 7, 8, local.config.mask_token_id, local.config.mask_token_id, 9]])
    with torch.no_grad():
        assert torch.allclose(remote.model(ids).logits, local.model(ids).logits, atol=1e-6)
    # the commands take a Hub id for --model too
    assert main(["generate", "--model", REPO, "--prompt", "tom has 5 apples", "--max-new-tokens", "4"]) == 0
    # every file push sends (but the card) is one the download asks for
    for name in MODEL_FILES:
        assert any(fnmatch.fnmatch(name, p) for p in DOWNLOAD_PATTERNS), name


def _http_error(cls, status: int, message: str):
    """An error as huggingface_hub raises it for an HTTP status (a stand-in response: nothing is requested)."""
    return cls(message, response=SimpleNamespace(status_code=status, headers={}, request=None))


def test_load_of_an_unknown_repo_says_so(monkeypatch):
    def snapshot_download(repo_id, **kwargs):
        raise _http_error(RepositoryNotFoundError, 404, "404 Client Error. Repository Not Found")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(FileNotFoundError, match="no local directory 'no/such' and no Hub model repository 'no/such'"):
        load("no/such")


def test_load_of_a_repo_that_is_not_an_llm2diff_model(monkeypatch, tmp_path):
    make_tokenizer().save_pretrained(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="has no diffusion_config.json: it is not a model saved by llm2diff"):
        load("Qwen/Qwen3-0.6B")


def test_load_of_a_missing_path_does_not_go_to_the_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("went to the Hub"))
    with pytest.raises(FileNotFoundError, match="no saved model at"):
        load(tmp_path / "nowhere")
    assert looks_like_repo_id("alice/model") and not looks_like_repo_id("./alice/model")
    assert not looks_like_repo_id("a/b/c") and not looks_like_repo_id("/abs/path")


def test_push_of_a_directory_that_is_not_a_model(model_dir, hub, capsys, tmp_path):
    code, _, err = push(capsys, tmp_path, "--repo-id", REPO)
    assert code == 2 and "is not a model saved by llm2diff: missing diffusion_config.json" in err
    assert "adapter_config.json + adapter_model.safetensors" in err and "the tokenizer" in err
    base = model_dir.parent / "base"  # a stock checkpoint: weights and tokenizer, no diffusion settings
    code, _, err = push(capsys, base, "--repo-id", REPO)
    assert code == 2 and "missing diffusion_config.json" in err and "model.safetensors" not in err
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "adapter_model.safetensors").unlink()
    code, _, err = push(capsys, broken, "--repo-id", REPO)
    assert code == 2 and "missing adapter_model.safetensors" in err
    code, _, err = push(capsys, tmp_path / "nowhere", "--repo-id", REPO)
    assert code == 2 and "is not a directory" in err
    assert hub.repos == [] and hub.commits == []


@pytest.mark.parametrize("repo_id", ["tiny-dlm", "alice/team/tiny", "alice/", "/tiny", "alice/tiny--dlm",
                                     "alice/-tiny", "alice/tiny.git", "alice/tiny dlm"])
def test_push_refuses_a_bad_repo_id(model_dir, hub, capsys, repo_id):
    code, _, err = push(capsys, model_dir, "--repo-id", repo_id)
    assert code == 2 and f"repo id {repo_id!r}" in err
    assert hub.repos == [] and hub.commits == []


def test_push_refuses_a_file_holding_the_token(model_dir, hub, capsys, caplog, tmp_path):
    leaky = tmp_path / "leaky"
    shutil.copytree(model_dir, leaky)
    with open(leaky / "chat_template.jinja", "a") as f:
        f.write(f"{{# {TOKEN} #}}")
    code, out, err = push(capsys, leaky, "--repo-id", REPO, "--token", TOKEN)
    assert code == 2 and "chat_template.jinja contains your Hugging Face token" in err
    assert TOKEN not in out + err + caplog.text
    assert hub.repos == [] and hub.commits == []


def test_push_reports_a_refusal_by_the_hub(model_dir, hub, capsys, caplog, monkeypatch):
    def create_repo(self, repo_id, **kwargs):
        raise _http_error(HfHubHTTPError, 403, "403 Forbidden: You don't have the rights to create a model under "
                                               "the namespace \"alice\".")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    code, out, err = push(capsys, model_dir, "--repo-id", REPO, "--token", TOKEN)
    assert code == 1 and "the Hub refused the upload to alice/tiny-dlm: 403 Forbidden" in err
    assert TOKEN not in out + err + caplog.text
