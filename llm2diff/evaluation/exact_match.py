"""Exact-match accuracy of generated answers, for the diffusion model and (adapter off) its AR parent.

    report = compare_with_parent(dlm, problems, data_args, max_new_tokens=96)
    print(format_report(report))

Problems are rows with `question` and `answer` (GSM8K format, final `#### N`); prompts are rendered exactly as
the training data was (`llm2diff.training.data.render_example`), and answers are graded by the final number.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tqdm.auto import tqdm

from llm2diff.tasks.arithmetic import grade


@dataclass
class EvalResult:
    name: str
    accuracy: float
    correct: int
    total: int
    new_tokens: int
    seconds: float
    nfe: int | None = None
    row_forwards: int = 0  # forward passes summed over rows, counted while the row was still generating
    samples: list[dict] = field(default_factory=list)

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per forward pass, per sequence (1.0 for AR decoding)."""
        return self.new_tokens / self.row_forwards if self.row_forwards else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {"name": self.name, "accuracy": self.accuracy, "correct": self.correct, "total": self.total,
                "new_tokens": self.new_tokens, "seconds": round(self.seconds, 2),
                "tokens_per_second": round(self.tokens_per_second, 2), "nfe": self.nfe,
                "tokens_per_forward": round(self.tokens_per_forward, 3),
                "samples": self.samples[:5]}


def evaluate_answers(dlm, problems: list[dict], data_args, use_parent: bool = False, max_new_tokens: int = 96,
                     batch_size: int = 16, tokens_per_step: int = 1, threshold: float | None = None,
                     commit_rule: str | None = None, name: str | None = None, decoding=None,
                     **sampler) -> EvalResult:
    """Generate an answer for every problem and grade it. `use_parent`: the AR parent's greedy `generate`.

    Further keyword arguments go to `DiffusionLM.generate` as settings (`mode="verified"` or `"lossless"`, other
    commit rules, correction); the model's saved decoding does not apply (the row is graded with exactly its rule).
    `decoding` (a `DecodingConfig`) grades with exactly that configuration instead (e.g. the saved one).
    """
    from llm2diff.evaluation.completions import Throughput, complete
    from llm2diff.sampling.config import DecodingConfig
    from llm2diff.training.data import render_example

    mode = sampler.pop("mode", "block")
    tok = dlm.tokenizer
    rule = f"threshold {threshold}" if threshold is not None else f"{tokens_per_step}/step"
    if commit_rule and commit_rule != "confidence":
        rule += f", {commit_rule}"
    if decoding is not None:
        rule = describe_decoding(decoding)
    kind = "AR twin (block 1)" if dlm.config.block_size == 1 else f"diffusion (block {dlm.config.block_size}, {rule})"
    name = name or ("AR parent (greedy generate)" if use_parent else kind)
    if use_parent:
        decoding = DecodingConfig(max_new_tokens=max_new_tokens)
    elif decoding is not None:
        decoding = decoding.replace(max_new_tokens=max_new_tokens)
    else:  # exactly the rule named in the row (the library's defaults under it), not the model's saved decoding
        block_rule = {"tokens_per_step": tokens_per_step, "commit_rule": commit_rule} if mode == "block" else {}
        overrides = {k: v for k, v in {"threshold": threshold, **block_rule, **sampler}.items() if v is not None}
        decoding = DecodingConfig(mode=mode, max_new_tokens=max_new_tokens).replace(**overrides)
    correct, samples, cost = 0, [], Throughput()
    for lo in tqdm(range(0, len(problems), batch_size), desc=f"eval {name}", leave=False):
        batch = problems[lo : lo + batch_size]
        prompts = [render_example({"question": p["question"], "answer": ""}, tok, data_args)[0] for p in batch]
        done = complete(dlm, prompts, decoding, ar_parent=use_parent)
        cost.add_batch(done)
        for problem, row in zip(batch, done.rows):
            ok = grade(row.text, problem["answer"])
            correct += ok
            if len(samples) < 5:
                samples.append({"question": problem["question"], "output": row.text, "correct": bool(ok)})
    return EvalResult(name, correct / max(len(problems), 1), correct, len(problems), cost.new_tokens, cost.seconds,
                      cost.nfe, cost.row_forwards, samples)


def describe_decoding(decoding) -> str:
    """A short name for a decoding: its mode and the settings that differ from the library's defaults."""
    settings = {k: v for k, v in decoding.non_default().items() if k not in ("mode", "max_new_tokens")}
    text = ", ".join(f"{k} {v}" for k, v in settings.items())
    return f"as saved: {decoding.mode}" + (f", {text}" if text else "")


def compare_with_parent(dlm, problems: list[dict], data_args, compare_parent: bool = True,
                        threshold: float | None = None, **kwargs) -> list[EvalResult]:
    """The diffusion model as it decodes by default (its saved `decoding`), with `tokens_per_step` per step, again
    with `threshold` if given, then the AR parent.

    The saved decoding's row is left out when it is the plain `tokens_per_step` row. An AR twin (block size 1) is
    graded once: with one position per block, a threshold decodes exactly as 1/step. A model with causal clean
    blocks is also graded by verified decoding at `threshold` (its AR stream's output).
    """
    from llm2diff.sampling.config import DecodingConfig

    results = []
    plain = DecodingConfig(tokens_per_step=kwargs.get("tokens_per_step", 1))
    saved = getattr(dlm, "decoding", None)
    if saved is not None and saved.replace(max_new_tokens=plain.max_new_tokens) != plain and \
            dlm.config.block_size > 1:
        results.append(evaluate_answers(dlm, problems, data_args, decoding=saved, **kwargs))
    results.append(evaluate_answers(dlm, problems, data_args, **kwargs))
    if threshold is not None and dlm.config.block_size > 1:
        results.append(evaluate_answers(dlm, problems, data_args, threshold=threshold, **kwargs))
        if dlm.config.causal_clean:
            name = f"diffusion (block {dlm.config.block_size}, verified, threshold {threshold})"
            results.append(evaluate_answers(dlm, problems, data_args, threshold=threshold, mode="verified", name=name,
                                            **kwargs))
    if compare_parent:  # without an adapter the parent is loaded from the recorded base (`dlm.ar_parent`)
        results.append(evaluate_answers(dlm, problems, data_args, use_parent=True, **kwargs))
    return results


def format_report(results: list[EvalResult]) -> str:
    lines = [f"{'model':40s} {'accuracy':>9s} {'correct':>9s} {'tokens/s':>9s} {'tokens/forward':>15s}"]
    for r in results:
        lines.append(f"{r.name:40s} {r.accuracy:9.1%} {r.correct:4d}/{r.total:<4d} {r.tokens_per_second:9.1f} "
                     f"{r.tokens_per_forward:15.2f}")
    return "\n".join(lines)
