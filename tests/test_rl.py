"""llm2diff.rl: diffusion log-prob estimators, process-reward advantages, the reference adapter, a GRPO step."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, make_tokenizer

from llm2diff import adapt
from llm2diff.rl import logprobs as lp
from llm2diff.rl.advantages import process_advantages
from llm2diff.rl.logprobs import batch_seed, coupled_masks, diffusion_token_logps, row_seeds

PROMPTS = torch.tensor([[0, 25, 26, 27], [28, 29, 30, 31]])       # row 0 left-padded
PROMPT_MASK = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
COMPLETIONS = torch.tensor([[32, 33, 34, 35, 36, 2], [37, 38, 2, 0, 0, 0]])
COMPLETION_MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])


def make_dlm(block_size: int = 4, arch: str = "qwen3", perturb: bool = True):
    """A tiny adapted model; `perturb` moves the LoRA and the mask-token row off their initial values ('trained')."""
    from peft import LoraConfig

    dlm = adapt(make_model(arch), make_tokenizer(), block_size=block_size,
                lora=LoraConfig(r=4, target_modules="all-linear"))
    if perturb:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in dlm.model.named_parameters():
                if "lora_B" in name or "trainable_tokens_delta" in name:
                    param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return dlm


def logps(dlm, estimator="one_pass", seed=0, model=None, **kwargs):
    c = dlm.config
    return diffusion_token_logps(model or dlm.model, PROMPTS, PROMPT_MASK, COMPLETIONS, COMPLETION_MASK,
                                 c.block_size, c.mask_token_id, dlm.tokenizer.pad_token_id, shift=c.shift,
                                 estimator=estimator, seed=seed, **kwargs)


# -- estimators --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["one_pass", "coupled"])
def test_estimator_is_deterministic_for_a_seed_and_zero_at_padding(estimator):
    dlm = make_dlm()
    a, b = logps(dlm, estimator, seed=7, mask_prompt_prob=0.3), logps(dlm, estimator, seed=7, mask_prompt_prob=0.3)
    assert torch.equal(a, b)
    assert a.shape == COMPLETIONS.shape and bool((a[COMPLETION_MASK.bool()] < 0).all())
    assert bool((a[COMPLETION_MASK == 0] == 0).all())
    empty = diffusion_token_logps(dlm.model, PROMPTS, PROMPT_MASK, COMPLETIONS, torch.zeros_like(COMPLETION_MASK), 4,
                                  dlm.config.mask_token_id, 0, estimator=estimator, seed=7)
    assert bool((empty == 0).all()) and empty.requires_grad  # e.g. masked truncated completions
    # what sits in the padding does not matter
    other = COMPLETIONS.masked_fill(COMPLETION_MASK == 0, 40)
    c = diffusion_token_logps(dlm.model, PROMPTS, PROMPT_MASK, other, COMPLETION_MASK, 4, dlm.config.mask_token_id,
                              0, estimator=estimator, seed=7, mask_prompt_prob=0.3)
    assert torch.equal(a, c)


def test_other_seeds_draw_other_masks():
    dlm = make_dlm()
    coupled = [logps(dlm, "coupled", seed=s, t=0.5) for s in range(3)]
    assert not torch.equal(coupled[0], coupled[1]) and not torch.equal(coupled[1], coupled[2])
    prompt_masked = [logps(dlm, "one_pass", seed=s, mask_prompt_prob=0.5) for s in range(2)]
    assert not torch.equal(prompt_masked[0], prompt_masked[1])
    # one_pass without prompt masking has nothing random in it
    assert torch.equal(logps(dlm, "one_pass", seed=0), logps(dlm, "one_pass", seed=1))


def test_row_seeds_make_each_row_independent_of_its_batch():
    dlm = make_dlm()
    ids, mask = torch.cat([PROMPTS, COMPLETIONS], 1), torch.cat([PROMPT_MASK, COMPLETION_MASK], 1)
    seeds = row_seeds(ids, mask)
    assert seeds == row_seeds(ids, mask) and seeds[0] != seeds[1]
    assert batch_seed(ids) == batch_seed(ids.clone()) and batch_seed(ids) != batch_seed(ids.flip(0))
    full = logps(dlm, "coupled", seed=seeds)
    c = dlm.config
    for b in range(2):  # each row alone (no padding around it) gets exactly its in-batch values
        keep_p, keep_c = PROMPT_MASK[b].bool(), COMPLETION_MASK[b].bool()
        p, comp = PROMPTS[b][keep_p][None], COMPLETIONS[b][keep_c][None]
        alone = diffusion_token_logps(dlm.model, p, torch.ones_like(p), comp, torch.ones_like(comp), c.block_size,
                                      c.mask_token_id, 0, estimator="coupled",
                                      seed=row_seeds(torch.cat([p, comp], 1)))
        torch.testing.assert_close(alone[0], full[b][keep_c], rtol=0, atol=1e-5)


@pytest.mark.parametrize("estimator", ["one_pass", "coupled"])
def test_estimator_is_differentiable_through_lora_and_mask_row(estimator):
    dlm = make_dlm(perturb=False)
    dlm.model.train()
    logps(dlm, estimator, seed=3).sum().backward()
    grads = {n: p.grad for n, p in dlm.model.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    mask_row = next(g for n, g in grads.items() if "trainable_tokens_delta" in n)
    assert mask_row is not None and mask_row.abs().sum() > 0


def test_block_size_one_one_pass_equals_the_ar_log_probs():
    dlm = make_dlm(block_size=1)
    got = logps(dlm, "one_pass", seed=0)
    with torch.no_grad():
        for b in range(2):
            keep_p, keep_c = PROMPT_MASK[b].bool(), COMPLETION_MASK[b].bool()
            prompt, completion = PROMPTS[b][keep_p], COMPLETIONS[b][keep_c]
            ids = torch.cat([prompt, completion])[None]
            logits = dlm.model(input_ids=ids).logits[0].float()
            ar = torch.log_softmax(logits, -1)[len(prompt) - 1: -1].gather(-1, completion[:, None])[:, 0]
            torch.testing.assert_close(got[b][keep_c].detach(), ar, rtol=0, atol=1e-5)


def test_coupled_scores_every_token_exactly_once_per_pair(monkeypatch):
    dlm = make_dlm()
    seen = {}
    real = lp.layout_logits

    def spy(model, layout, input_ids, select, *args, **kwargs):
        seen.update(layout=layout, input_ids=input_ids, select=select)
        return real(model, layout, input_ids, select, *args, **kwargs)

    monkeypatch.setattr(lp, "layout_logits", spy)
    logps(dlm, "coupled", seed=5, t=0.5)
    select, layout, ids = seen["select"], seen["layout"], seen["input_ids"]
    batch = PROMPTS.shape[0]
    assert select.shape[0] == 2 * batch  # the pass with m and the pass with its complement, in one forward
    valid = torch.zeros_like(select[:batch])
    valid[:, : COMPLETIONS.shape[1]] = COMPLETION_MASK.bool()
    assert torch.equal(select[:batch].int() + select[batch:].int(), valid.int())  # exactly once
    assert select[:batch].any() and select[batch:].any()
    rows, cols = select.nonzero(as_tuple=True)  # ...and always from the pass in which the token is masked
    assert bool((ids[rows, layout.noisy_index[rows, cols]] == dlm.config.mask_token_id).all())
    # the masks on their own
    m, comp = coupled_masks(valid, torch.full((batch,), 0.5), torch.Generator().manual_seed(0))
    assert not (m & comp).any() and torch.equal(m | comp, valid)


def test_coupled_with_t_one_is_the_one_pass_estimate():
    dlm = make_dlm()
    torch.testing.assert_close(logps(dlm, "coupled", seed=2, t=1.0), logps(dlm, "one_pass"), rtol=0, atol=1e-5)


def test_estimator_arguments_are_checked():
    dlm = make_dlm(perturb=False)
    with pytest.raises(ValueError, match="estimator must be one of one_pass, coupled"):
        logps(dlm, "two_pass")
    with pytest.raises(ValueError, match="one int per row"):
        logps(dlm, seed=[1, 2, 3])


# -- process advantages ------------------------------------------------------------------------------------------
def test_process_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 2.0, 2.0])
    spans = [[(0, 1), (2, 3)], [(0, 2)], [(1, 1)], [(0, 0)]]
    scores = [[1.0, 0.0], [0.5], [3.0], [1.0]]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    got = process_advantages(rewards, spans, scores, group_size=2, process_weight=0.5, completion_mask=mask)
    eps = 1e-4
    out = 0.5 / (2 ** 0.5 / 2 + eps)            # group 1: rewards {1, 0}: mean .5, sample std sqrt(.5)
    step = 0.5 / (0.5 + eps)                    # group 1: scores {1, 0, .5}: mean .5, sample std .5
    step2 = 1.0 / (2 ** 0.5 + eps)              # group 2: scores {3, 1}: mean 2, sample std sqrt(2); rewards equal
    expected = torch.tensor([
        [out + 0.5 * step, out + 0.5 * step, out - 0.5 * step, out - 0.5 * step],
        [-out, -out, -out, 0.0],
        [0.0, 0.5 * step2, 0.0, 0.0],
        [-0.5 * step2, 0.0, 0.0, 0.0],
    ])
    torch.testing.assert_close(got, expected)
    outcome_only = process_advantages(rewards, spans, scores, 2, 0.0, mask)
    torch.testing.assert_close(outcome_only, torch.tensor([[out] * 4, [-out] * 3 + [0.0], [0.0] * 4, [0.0] * 4]))


def test_process_advantages_errors():
    mask = torch.ones(4, 3)
    ok = dict(step_spans=[[(0, 0)]] * 4, step_scores=[[1.0]] * 4, process_weight=1.0, completion_mask=mask)
    with pytest.raises(ValueError, match="not a whole number of groups of group_size=3"):
        process_advantages(torch.zeros(4), group_size=3, **ok)
    with pytest.raises(ValueError, match="completion 1: 2 step spans but 1 step scores"):
        process_advantages(torch.zeros(4), [[(0, 0)], [(0, 0), (1, 2)], [], []], [[1.0], [1.0], [], []], 2, 1.0, mask)
    with pytest.raises(ValueError, match="3 span lists and 4 score lists for 4 completions"):
        process_advantages(torch.zeros(4), [[]] * 3, [[]] * 4, 2, 1.0, mask)
    with pytest.raises(ValueError, match=r"step span \(1, 3\) is not inside"):
        process_advantages(torch.zeros(4), [[(1, 3)], [], [], []], [[1.0], [], [], []], 2, 1.0, mask)


# -- the trainer ---------------------------------------------------------------------------------------------------
def _dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["tom has 3 apples", "ana buys 2 pears"] * 8})


def _args(tmp_path, **overrides):
    from llm2diff.rl.grpo import DiffusionGRPOConfig

    fields = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=8,
                  max_completion_length=8, learning_rate=1e-2, max_steps=1, bf16=False, use_cpu=True,
                  report_to="none", logging_steps=1, save_strategy="no", beta=0.04, seed=0,
                  disable_dropout=True)
    fields.update(overrides)
    return DiffusionGRPOConfig(**fields)


def _trainer(dlm, tmp_path, reward_funcs, **overrides):
    from llm2diff.rl.grpo import DiffusionGRPOTrainer

    process_reward = overrides.pop("process_reward", None)
    return DiffusionGRPOTrainer(model=dlm.model, diffusion_config=dlm.config, reward_funcs=reward_funcs,
                                args=_args(tmp_path, **overrides), train_dataset=_dataset(),
                                processing_class=dlm.tokenizer, process_reward=process_reward)


def _contains_apples(prompts, completions, **kwargs):
    return [1.0 if "apples" in c.split() else 0.0 for c in completions]


def _mask_rows(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "trainable_tokens_delta" in n}


def test_stock_default_copy_misses_the_mask_row_and_the_check_catches_it(tmp_path):
    from llm2diff.rl.grpo import adapter_parameter_pairs

    dlm = make_dlm()
    names = [n for n, _ in dlm.model.named_parameters()]
    stock = [n for n in names if ".default." in n]  # what GRPOTrainer.__init__ copies into the "ref" adapter
    delta = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"
    assert delta in names and delta not in stock and all("lora_" in n for n in stock)
    assert (delta, delta[: -len("default")] + "ref") in adapter_parameter_pairs(dlm.model)

    trainer = _trainer(dlm, tmp_path, [_contains_apples])
    model = trainer.accelerator.unwrap_model(trainer.model)
    rows = _mask_rows(model)
    ref_name = delta[: -len("default")] + "ref"
    assert torch.equal(rows[ref_name], rows[delta])  # fixed: the reference mask row is the policy's
    # undo the fix (what the stock copy leaves: the untrained row) and the init check refuses it
    with torch.no_grad():
        model.get_parameter(ref_name).copy_(model.get_base_model().model.embed_tokens.token_adapter.base_layer
                                            .weight[[dlm.config.mask_token_id]])
    assert not torch.equal(model.get_parameter(ref_name), model.get_parameter(delta))
    with pytest.raises(RuntimeError, match="reference adapter does not reproduce the policy"):
        trainer.check_reference()


def test_reference_equals_the_initial_policy(tmp_path):
    from trl.trainer.utils import use_adapter

    dlm = make_dlm()
    trainer = _trainer(dlm, tmp_path, [_contains_apples], diffusion_estimator="coupled", mask_prompt_prob=0.2)
    model = trainer.accelerator.unwrap_model(trainer.model)
    ref_params = {n: p for n, p in model.named_parameters() if ".ref" in n}
    assert ref_params and not any(p.requires_grad for p in ref_params.values())
    ids, mask = torch.cat([PROMPTS, COMPLETIONS], 1), torch.cat([PROMPT_MASK, COMPLETION_MASK], 1)
    model.eval()
    with torch.no_grad():
        policy, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, COMPLETIONS.shape[1])
        with use_adapter(model, "ref"):
            reference, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, COMPLETIONS.shape[1])
        with model.disable_adapter():
            base, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, COMPLETIONS.shape[1])
    assert torch.equal(policy, reference)
    assert not torch.allclose(policy, base)  # the perturbed adapter matters: the check is not vacuous
    with torch.no_grad():  # entropies (TRL's loss always asks for them) come from the same logits
        again, entropy, aux = trainer._get_per_token_logps_and_entropies(model, ids, mask, COMPLETIONS.shape[1],
                                                                         compute_entropy=True)
    assert torch.equal(again, policy) and aux is None
    valid = COMPLETION_MASK.bool()
    assert bool((entropy[~valid] == 0).all()) and bool((entropy[valid] > 0).all())
    assert bool((entropy[valid] <= torch.log(torch.tensor(float(dlm.model.config.vocab_size))) + 1e-4).all())


def test_generation_cuts_after_the_first_eos(tmp_path):
    dlm = make_dlm()
    trainer = _trainer(dlm, tmp_path, [_contains_apples], beta=0.0)
    prompt = dlm.tokenizer("tom has 3 apples")["input_ids"]
    completions, logprobs = trainer._generate_single_turn([prompt, prompt[:2]], None, {}, 2)
    assert logprobs is None and len(completions) == 2
    eos = set(trainer.eos_token_ids)
    for ids in completions:
        assert 1 <= len(ids) <= 8 and not eos & set(ids[:-1])
        assert dlm.config.mask_token_id not in ids
        assert ids[-1] in eos or len(ids) == 8


def _no_apples(prompts, completions, **kwargs):
    return [0.0 if "apples" in c.split() else 1.0 for c in completions]


@pytest.mark.parametrize("estimator,reward,direction", [("coupled", _contains_apples, 1), ("one_pass", _no_apples, -1)])
def test_grpo_steps_move_the_log_prob_of_the_rewarded_completion(tmp_path, estimator, reward, direction):
    """Rewarding completions with "apples" raises log p("apples ... <eos>"); rewarding those without lowers it."""
    dlm = make_dlm(perturb=False)
    apples = dlm.tokenizer.convert_tokens_to_ids("apples")
    eos = dlm.tokenizer.eos_token_id
    prompt = torch.tensor([dlm.tokenizer("tom has 3 apples")["input_ids"]])
    completion = torch.tensor([[apples] * 7 + [eos]])
    c = dlm.config

    def score():
        with torch.no_grad():
            return diffusion_token_logps(dlm.model, prompt, torch.ones_like(prompt), completion,
                                         torch.ones_like(completion), c.block_size, c.mask_token_id, 0).sum().item()

    before = score()
    trainer = _trainer(dlm, tmp_path, [reward], max_steps=4, diffusion_estimator=estimator)
    model = trainer.accelerator.unwrap_model(trainer.model)
    ref_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".ref" in n}
    rows_before = _mask_rows(model)
    trainer.train()
    rewards = [log["reward"] for log in trainer.state.log_history if "reward" in log]
    assert len(rewards) == 4 and 0 < sum(rewards) < 4  # mixed groups: there was something to learn
    after = score()
    assert direction * (after - before) > 0.5, (before, after)
    rows_after = _mask_rows(model)
    policy_row = next(n for n in rows_after if n.endswith(".default"))
    assert not torch.equal(rows_after[policy_row], rows_before[policy_row])  # the mask row trains
    assert all(torch.equal(p, ref_before[n]) for n, p in model.named_parameters() if ".ref" in n)  # ref frozen


def test_old_and_reference_log_probs_match_the_policy_before_the_first_update(tmp_path):
    """Masks are seeded per row, so TRL's old / reference log-probs (computed on the whole generation batch) equal
    the policy's (computed on shuffled micro-batches) until the first optimizer step."""
    dlm = make_dlm()
    trainer = _trainer(dlm, tmp_path, [_contains_apples], per_device_train_batch_size=4,
                       gradient_accumulation_steps=2, num_iterations=2, diffusion_estimator="coupled",
                       mask_prompt_prob=0.2)
    seen = []
    original = trainer._compute_loss

    def spy(model, inputs):
        if not seen:
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            with torch.no_grad():
                now, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, ids.shape[1]
                                                                       - inputs["prompt_ids"].shape[1])
            seen.append((now, inputs["old_per_token_logps"], inputs["ref_per_token_logps"]))
        return original(model, inputs)

    trainer._compute_loss = spy
    trainer.train()
    now, old, ref = seen[0]
    torch.testing.assert_close(old, now, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref, now, rtol=0, atol=1e-5)


def test_reward_function_with_the_wrong_count_fails_clearly(tmp_path):
    def short(prompts, completions, **kwargs):
        return [1.0]

    trainer = _trainer(make_dlm(), tmp_path, [short], beta=0.0)
    with pytest.raises(ValueError, match=r"returned 1 rewards, but 8 were expected"):
        trainer.train()


def test_process_rewards_give_per_token_advantages(tmp_path):
    calls = []

    def per_token_steps(prompts, completions, completion_ids):
        calls.append(len(completion_ids))
        spans = [[(j, j) for j in range(len(ids))] for ids in completion_ids]
        return spans, [[float(j % 2) for j in range(len(ids))] for ids in completion_ids]

    dlm = make_dlm()
    trainer = _trainer(dlm, tmp_path, [_contains_apples], beta=0.0, process_weight=0.5,
                       process_reward=per_token_steps)
    seen = []
    original = trainer._compute_loss

    def spy(model, inputs):
        seen.append((inputs["advantages"].clone(), inputs["completion_mask"].clone()))
        return original(model, inputs)

    trainer._compute_loss = spy
    trainer.train()
    assert calls == [8]
    advantages, mask = seen[0]
    assert advantages.shape == mask.shape and advantages.dim() == 2
    assert bool((advantages[mask == 0] == 0).all()) and advantages[mask.bool()].abs().sum() > 0

    def wrong(prompts, completions, completion_ids):
        return [[]], [[]]

    trainer = _trainer(dlm, tmp_path, [_contains_apples], beta=0.0, process_weight=0.5, process_reward=wrong)
    with pytest.raises(ValueError, match="process_reward returned 1 span lists and 1 score lists for 8"):
        trainer.train()


def test_trainer_settings_are_checked(tmp_path):
    from llm2diff.rl.grpo import DiffusionGRPOTrainer

    with pytest.raises(ValueError, match="diffusion_estimator must be one of one_pass, coupled"):
        _args(tmp_path, diffusion_estimator="exact")
    dlm = make_dlm(perturb=False)
    with pytest.raises(ValueError, match="process_weight > 0 needs a process_reward"):
        _trainer(dlm, tmp_path, [_contains_apples], process_weight=1.0)
    trainer = DiffusionGRPOTrainer(model=dlm, reward_funcs=[_contains_apples], args=_args(tmp_path, beta=0.0),
                                   train_dataset=_dataset())  # a DiffusionLM brings its config and tokenizer
    assert trainer.diffusion_config is dlm.config and trainer.processing_class is dlm.tokenizer
    with pytest.raises(TypeError, match="PeftModel"):
        DiffusionGRPOTrainer(model=make_model("qwen3"), diffusion_config=dlm.config, reward_funcs=[_contains_apples],
                             args=_args(tmp_path), train_dataset=_dataset(), processing_class=dlm.tokenizer)


# -- self-conditioned models ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["expected_embedding", "hidden"])
def test_a_self_conditioned_model_is_scored_as_the_sampler_runs_it(kind):
    """one_pass on a self-conditioned model = the sampler's second pass over each fully masked block (conditioned on
    the first, as with latent_steps 1), clean earlier blocks before it; a fresh path scores as without it; the
    path gets a gradient."""
    from peft import LoraConfig

    from llm2diff.modeling.lora import embedding_weight
    from llm2diff.modeling.self_conditioning import expected_embedding, self_conditioning_module
    from llm2diff.sampling.block_cache import BlockContext

    dlm = adapt(make_model("qwen3"), make_tokenizer(), block_size=4, self_conditioning=kind,
                lora=LoraConfig(r=4, target_modules="all-linear"))
    c = dlm.config
    fresh = logps(dlm, "coupled", seed=3, self_conditioning=kind, vocab_size=c.vocab_size)
    torch.testing.assert_close(fresh, logps(dlm, "coupled", seed=3), rtol=0, atol=1e-6)
    module = self_conditioning_module(dlm.model).modules_to_save["default"]
    with torch.no_grad():
        module.proj.weight.copy_(torch.randn(module.proj.weight.shape, generator=torch.Generator().manual_seed(0)))
    got = logps(dlm, "one_pass", self_conditioning=kind, vocab_size=c.vocab_size)
    assert not torch.allclose(got, logps(dlm, "one_pass"), atol=1e-3)  # the path is used
    got.sum().backward()
    assert module.proj.weight.grad is not None and module.proj.weight.grad.abs().sum() > 0
    mask_id = c.mask_token_id
    for b in range(2):
        prompt = PROMPTS[b][PROMPT_MASK[b].bool()][None]
        completion = COMPLETIONS[b][COMPLETION_MASK[b].bool()].tolist()
        ctx = BlockContext(dlm.model, prompt, torch.ones_like(prompt), block_size=4, shift=c.shift,
                           keep_hidden=kind == "hidden")
        expected = []
        with torch.no_grad():
            for start in range(0, len(completion), 4):
                canvas = torch.full((1, 4), mask_id)
                first = ctx.block_logits(canvas)
                cols = torch.arange(4)
                carried = ctx.block_hidden[0].float() if kind == "hidden" else \
                    expected_embedding(first[0], embedding_weight(dlm.model), mask_id, c.vocab_size)
                second = ctx.block_logits(canvas, (torch.zeros_like(cols), cols, carried))[0].float()
                block = completion[start:start + 4]
                expected += torch.log_softmax(second, -1)[torch.arange(len(block)), torch.tensor(block)].tolist()
                ctx.commit(torch.tensor([block + [dlm.tokenizer.pad_token_id] * (4 - len(block))]))
        torch.testing.assert_close(got[b, :len(completion)].detach(), torch.tensor(expected), rtol=0, atol=1e-4)
