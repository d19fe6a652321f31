"""The package's shape: no import loops (imports inside functions count too), tasks do not import training, and the
model wrapper does not import a decoder."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llm2diff"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each llm2diff module -> the llm2diff modules it imports anywhere in its code."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_loops():
    assert cycles(imports()) == []


def test_the_layers_point_one_way():
    graph = imports()
    assert not [m for m in graph if m.startswith("llm2diff.tasks") and
                any(t.startswith("llm2diff.training") for t in graph[m])], "tasks import training"
    decoders = {"llm2diff.sampling.sampler", "llm2diff.sampling.verified", "llm2diff.sampling.lossless"}
    assert not graph["llm2diff.modeling.diffusion_lm"] & decoders, "the model wrapper imports a decoder"
    assert not [m for m in decoders if "llm2diff.modeling.diffusion_lm" in graph[m]], "a decoder imports the wrapper"


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_each_fact_is_stored_once():
    import dataclasses

    from llm2diff.modeling.config import LEGACY_NOISE_KEYS, LEGACY_SAMPLER_KEYS, DiffusionConfig
    from llm2diff.noise.masking import NoiseSpec
    from llm2diff.training.config import DiffusionSFTConfig

    # the noise lives in DiffusionConfig.noise only; the decoding in decoding_config.json only
    fields = {f.name for f in dataclasses.fields(DiffusionConfig)}
    assert not fields & (set(LEGACY_NOISE_KEYS) | set(LEGACY_SAMPLER_KEYS))
    # every NoiseSpec field is set by a recipe key that exists, named in one place (its metadata)
    recipe = {f.name for f in dataclasses.fields(DiffusionSFTConfig)}
    assert set(NoiseSpec.recipe_keys().values()) <= recipe
    spec = DiffusionSFTConfig(output_dir="unused", use_cpu=True, report_to="none", noise_schedule="cosine",
                              noise_unit="sequence", loss_weighting="mean", complementary_masks=True,
                              position_masking_strength=0.5).noise_spec()
    assert (spec.schedule, spec.unit, spec.weighting, spec.complementary, spec.position_strength) == \
        ("cosine", "sequence", "mean", True, 0.5)
    # file names written in one place
    for literal in ('"significance.safetensors"', '"decoding_config.json"', '"diffusion_config.json"'):
        where = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if literal in p.read_text()]
        assert len(where) == 1, (literal, where)


def test_no_module_over_500_lines_without_a_reason():
    """A module past about 500 lines says in its docstring why it is one job ("Over 500 lines because ...")."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 500 and "Over 500 lines because" not in (ast.get_docstring(ast.parse(text)) or ""):
            long.append((str(path.relative_to(PACKAGE)), len(text.splitlines())))
    assert long == []


def test_generate_takes_a_handful_of_named_parameters():
    """Decoding settings go through `decoding` and keyword settings, never as parameters of their own."""
    import inspect

    from llm2diff import DiffusionLM

    named = [p.name for p in inspect.signature(DiffusionLM.generate).parameters.values()
             if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert named == ["self", "input_ids", "attention_mask", "decoding", "response_prefix", "streamer"]
