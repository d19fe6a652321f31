"""Every decoder and commit rule gives the recorded tokens and pass counts (tests/golden/decoding.json, written by
tests/golden_decoding.py before the decoding redesign): refactoring the decoding API changes no output."""

from __future__ import annotations

import json

import pytest
from golden_decoding import CASES, GOLDEN, make_case_model, run_case

RECORDED = json.loads(GOLDEN.read_text())


def test_every_case_is_recorded():
    assert sorted(RECORDED) == sorted(name for name, _, _ in CASES)


@pytest.mark.parametrize("name,model,decoding", CASES, ids=[name for name, _, _ in CASES])
def test_decoding_gives_the_recorded_tokens_and_passes(name, model, decoding):
    assert run_case(make_case_model(model), decoding) == RECORDED[name]
