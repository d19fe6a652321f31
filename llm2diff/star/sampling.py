"""Sample rationales for a task's problems with the block sampler and grade them (the first two STaR steps).

    records = sample_and_grade(dlm, task, rows, k=4, options=SampleOptions({"temperature": 0.7}), seed=1,
                               out=Path("round-1/samples.jsonl"))

Problems are repeated k times and sampled in batches; every finished batch is appended to `out` (one JSON line per
problem), so an interrupted run picks up at the first problem not yet written. Under `accelerate launch` each
process samples its share of a batch; the main process gathers the results and writes them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from llm2diff.atomic import read_jsonl_records
from llm2diff.evaluation.completions import Throughput


@dataclass
class SampleOptions:
    """How to sample: `decoding` (decoding settings over the model's saved ones; always the block sampler, which
    is the decoder that samples) and the sequences per generate call."""

    decoding: dict = field(default_factory=lambda: {"temperature": 0.7, "max_new_tokens": 96})
    batch_size: int = 32


def _generate(dlm, prompts: list[list[int]], options: SampleOptions, seed: int):
    from llm2diff.evaluation.completions import complete

    done = complete(dlm, prompts, {**options.decoding, "mode": "block"}, seed=seed)  # sampled: the block sampler
    return [r.text.strip() for r in done.rows], [len(r.tokens) for r in done.rows], [r.passes for r in done.rows]


def sample_and_grade(
    dlm, task, rows: list[dict], k: int, options: SampleOptions, seed: int, out: Path,
    questions: list[str] | None = None, desc: str = "sampling",
) -> tuple[dict[str, dict], Throughput]:
    """Sample `k` completions per row, grade each with `task.grade`, append one record per row to `out`.

    Args:
        rows: the task's rows; each needs a stable id (`task.row_id`).
        questions: the prompt text per row (default: the task's question); e.g. the question with a hint.
        seed: the sampler seed of this stage; batch b uses `seed + b`, so a resumed run draws as a fresh one would.

    Returns:
        `{row_id: record}` for every row (written now or before) and this call's `Throughput`. A record:
        `{"id", "question", "samples": [{"text", "correct", "tokens"}], "num_correct"}`.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from llm2diff.evaluation.runner import PromptRenderer

    state = PartialState()
    render = PromptRenderer(dlm)
    ids = [task.row_id(row, i) for i, row in enumerate(rows)]
    questions = questions or [task.question(row) for row in rows]
    done = read_jsonl_records(out)
    per_batch = max(1, options.batch_size // k)
    batches = [list(range(lo, min(lo + per_batch, len(rows)))) for lo in range(0, len(rows), per_batch)]
    stats = Throughput()
    # per-batch cost, beside the records, so a resumed stage still reports its whole sampling time and throughput
    stats_path = out.with_name(out.name + ".stats")
    out.parent.mkdir(parents=True, exist_ok=True)
    todo = [(b, idx) for b, idx in enumerate(batches) if not all(ids[i] in done for i in idx)]
    pending = {b for b, _ in todo}
    for b, previous in read_jsonl_records(stats_path, key="batch").items():
        if b not in pending:  # a batch drawn again now reports its new cost instead
            stats.add(previous["seconds"], previous["tokens"], previous["forwards"], previous["sequences"])
    sink = out.open("a") if state.is_main_process else None
    stats_sink = stats_path.open("a") if state.is_main_process else None
    bar = tqdm(total=len(rows), initial=len(rows) - sum(len(i) for _, i in todo), desc=desc,
               disable=not state.is_main_process)
    try:
        # each process takes every n-th pending batch; results are gathered after every round of n batches
        step = state.num_processes
        for lo in range(0, len(todo), step):
            group = todo[lo : lo + step]
            mine = group[state.process_index] if state.process_index < len(group) else None
            produced: list[dict] = []
            if mine is not None:
                b, idx = mine
                start = time.perf_counter()
                prompts = [render(task, rows[i], [], questions[i]) for i in idx for _ in range(k)]
                texts, lengths, forwards = _generate(dlm, prompts, options, seed + b)
                seconds = time.perf_counter() - start
                for j, i in enumerate(idx):
                    samples = []
                    for s in range(k):
                        n = j * k + s
                        grade = task.grade(texts[n], rows[i])
                        samples.append({"text": texts[n], "correct": bool(grade.correct), "tokens": lengths[n]})
                    record = {"id": ids[i], "question": task.question(rows[i]), "samples": samples,
                              "num_correct": sum(x["correct"] for x in samples), "process": state.process_index}
                    if questions[i] != record["question"]:
                        record["prompt_question"] = questions[i]  # e.g. with a rationalization hint
                    produced.append(record)
                produced.append({"_stats": [seconds, sum(lengths), sum(forwards), len(texts)], "batch": b})
            for item in gather_object([produced]) if step > 1 else [produced]:
                for record in item:
                    if "_stats" in record:
                        seconds, tokens, forwards, sequences = record["_stats"]
                        seconds /= step  # processes run side by side
                        stats.add(seconds, tokens, forwards, sequences)
                        if stats_sink is not None:
                            stats_sink.write(json.dumps({"batch": record["batch"], "seconds": seconds, "tokens": tokens,
                                                         "forwards": forwards, "sequences": sequences}) + "\n")
                        continue
                    done[record["id"]] = record
                    if sink is not None:
                        sink.write(json.dumps(record) + "\n")
                        bar.update(1)
            if sink is not None:
                sink.flush()
                stats_sink.flush()
    finally:
        bar.close()
        if sink is not None:
            sink.close()
            stats_sink.close()
    return {i: done[i] for i in ids if i in done}, stats
