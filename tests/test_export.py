"""`llm2diff export --merge`: the merged full model gives the adapted model's logits and tokens without PEFT (the
trained mask-token row included, tied or untied embeddings), loads its AR parent separately from the recorded base
(parent logits, `ar_generate` and lossless mode as the adapted model's), pushes as a full model; bad input fails
clearly."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, make_tokenizer

from llm2diff import adapt, load
from llm2diff.cli import main
from llm2diff.export import merge_model
from llm2diff.modeling.parent import load_parent


def _saved_adapter(root, arch: str, tied: bool):
    """A LoRA-adapted tiny model with a non-trivial adapter and mask-token row, saved beside its base."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    base = make_model(arch)
    if tied:
        base.config.tie_word_embeddings = True
        base.lm_head.weight = base.model.embed_tokens.weight
    base.save_pretrained(root / "base")
    make_tokenizer().save_pretrained(root / "base")
    dlm = adapt(AutoModelForCausalLM.from_pretrained(root / "base"), make_tokenizer(), block_size=4,
                lora=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
                base_model_name_or_path=str(root / "base"))
    with torch.no_grad():
        for name, param in dlm.model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(torch.randn_like(param))
    dlm.save_pretrained(root / "dlm")
    (root / "dlm" / "final_eval.json").write_text('{"results": []}')
    return root / "dlm"


@pytest.fixture(scope="module", params=[("qwen3", False), ("llama", True)], ids=["qwen3", "llama-tied"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    source = _saved_adapter(root, *request.param)
    assert main(["export", str(source), "--merge", "--out", str(root / "merged")]) == 0
    return source, root / "merged"


def test_merged_model_is_a_full_model(exported):
    source, merged = exported
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "diffusion_config.json", "tokenizer.json",
            "final_eval.json"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors"}
    dlm = load(merged)
    assert not dlm.has_adapter and type(dlm.model).__name__.endswith("ForCausalLM")
    original = load(source)
    assert dlm.config.block_size == original.config.block_size
    assert dlm.config.mask_token_id == original.config.mask_token_id
    assert dlm.config.base_model_name_or_path == original.config.base_model_name_or_path
    assert dlm.config.base_model_source["merged_from"]["adapter"] == str(source)


def test_merged_model_reproduces_logits_and_tokens(exported):
    source, merged = exported
    adapted, full = load(source), load(merged)
    mask = adapted.config.mask_token_id
    ids = torch.tensor([[5, 6, 7, 8, 9, mask, mask, mask, 10], [0, 0, 5, 6, 7, mask, 11, mask, mask]])
    with torch.no_grad():
        a, b = adapted.model(ids).logits, full.model(ids).logits
    assert (a - b).abs().max().item() <= 1e-4
    with adapted.ar_parent() as parent, torch.no_grad():  # the adapter and the mask row moved the logits
        assert (a - parent(ids).logits).abs().max().item() > 1e-2
    prompt = torch.tensor([[0, 5, 6, 7, 8], [9, 10, 11, 12, 13]])
    attention = (prompt != 0).long()
    for kwargs in ({}, {"threshold": 0.3}):
        x = adapted.generate(prompt, attention, max_new_tokens=12, **kwargs)
        y = full.generate(prompt, attention, max_new_tokens=12, **kwargs)
        assert torch.equal(x.sequences, y.sequences)


def test_merged_model_loads_its_ar_parent_from_the_recorded_base(exported, caplog, tmp_path):
    source, merged = exported
    full, adapted = load(merged), load(source)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with caplog.at_level("WARNING", logger="llm2diff"):
        with full.ar_parent() as parent, adapted.ar_parent() as reference, torch.no_grad():
            assert parent is not full.model  # a separate copy: the merged weights are not the parent's
            assert torch.allclose(parent(ids).logits, reference(ids).logits, atol=1e-5)
    assert "not free" in caplog.text and repr(full.config.base_model_name_or_path) in caplog.text
    with full.ar_parent() as again:
        assert again is parent  # loaded once
    prompt = torch.tensor([[5, 6, 7, 8]])
    expected = adapted.ar_generate(prompt, max_new_tokens=6)
    assert torch.equal(full.ar_generate(prompt, max_new_tokens=6), expected)
    # lossless mode: drafted by the merged model, verified by the separately loaded parent: the parent's output
    out = full.generate(prompt, max_new_tokens=6, mode="lossless")
    assert torch.equal(out.sequences[:, : expected.shape[1]], expected)
    # the standalone helper gives the same parent
    with adapted.ar_parent() as reference, torch.no_grad():
        assert torch.allclose(load_parent(full.config)(ids).logits, reference(ids).logits, atol=1e-5)


def test_merged_model_whose_base_is_gone_says_what_to_do(exported, tmp_path):
    import shutil

    _, merged = exported
    moved = tmp_path / "merged"
    shutil.copytree(merged, moved)
    full = load(moved)
    full.config.base_model_name_or_path = str(tmp_path / "no-such-base")
    with pytest.raises(RuntimeError, match="its AR parent must be loaded from the recorded base") as err, \
            full.ar_parent():
        pass
    assert repr(str(tmp_path / "no-such-base")) in str(err.value) and "use_lora: true" in str(err.value)


def test_push_of_a_merged_model(exported, capsys, monkeypatch, tmp_path):
    import huggingface_hub
    import yaml

    _, merged = exported
    sent = {}

    def create_commit(self, repo_id, operations, **kwargs):
        sent.update({op.path_in_repo: op for op in operations})

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kwargs: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    assert main(["push", str(merged), "--repo-id", "alice/merged-dlm"]) == 0
    assert sorted(sent) == ["README.md", "chat_template.jinja", "config.json", "decoding_config.json",
                            "diffusion_config.json", "final_eval.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                            "tokenizer_config.json"]
    with sent["README.md"].as_file() as f:
        card = f.read().decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers" and "lora" not in meta["tags"]
    assert "the LoRA adapter merged in" in card and "need the parent loaded separately" in card


def test_export_bad_input(exported, capsys, tmp_path):
    source, merged = exported
    assert main(["export", str(source), "--out", str(tmp_path / "x")]) == 2
    assert "add --merge" in capsys.readouterr().err
    assert main(["export", str(merged), "--merge", "--out", str(tmp_path / "y")]) == 2
    assert "already a full model (no LoRA adapter): there is nothing to merge" in capsys.readouterr().err
    assert main(["export", str(source), "--merge", "--out", str(merged)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(source), "--merge", "--out", str(source), "--overwrite"]) == 2
    assert "is the source directory" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere"), "--merge", "--out", str(tmp_path / "z")]) == 2
    assert "no saved model at" in capsys.readouterr().err
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_merge_model_overwrite_and_dtype(exported, tmp_path):
    source, _ = exported
    out = tmp_path / "half"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    merge_model(source, out, dtype=torch.bfloat16, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert next(load(out).model.parameters()).dtype == torch.bfloat16
