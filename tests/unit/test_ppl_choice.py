"""compile --quantize auto --max-ppl-increase X: the cheapest mode within X, from measured perplexities handed to the
library's measuring parameter (no compile here)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tpugraph.cli import app
from tpugraph.compiler.ppl_choice import DEFAULT_CANDIDATES, Candidate, Measured, choose_by_perplexity
from tpugraph.errors import UsageError

REFERENCE = 20.0
# perplexity per mode, as a measurement might give them: the fewer bits, the worse
PERPLEXITY = {"w4bf16 g128": 21.2, "w4bf16 g64": 20.9, "w8bf16": 20.3, "bf16": 20.16}


def measured_from(values: dict[str, float], calls: list[str]):
    def measure(candidate: Candidate) -> Measured:
        calls.append(candidate.label)
        return Measured(candidate, values[candidate.label], REFERENCE, seconds=1.0)

    return measure


def test_candidates_go_from_the_fewest_bits_per_weight():
    bits = [c.bits_per_weight for c in DEFAULT_CANDIDATES]
    assert bits == sorted(bits) and bits[-1] == 16.0
    assert Candidate("w4bf16", 128).bits_per_weight < Candidate("w4bf16", 64).bits_per_weight < 8


@pytest.mark.parametrize("bound, picked, measured", [
    (10.0, "w4bf16 g128", ["w4bf16 g128"]),  # +6%: the cheapest is good enough, nothing else is compiled
    (5.0, "w4bf16 g64", ["w4bf16 g128", "w4bf16 g64"]),  # +6% over, +4.5% within
    (2.0, "w8bf16", ["w4bf16 g128", "w4bf16 g64", "w8bf16"]),
    (1.0, "bf16", ["w4bf16 g128", "w4bf16 g64", "w8bf16", "bf16"]),
])
def test_the_cheapest_mode_within_the_bound_is_picked(bound, picked, measured):
    calls: list[str] = []
    choice = choose_by_perplexity(bound, measured_from(PERPLEXITY, calls))
    assert choice.chosen.label == picked
    assert calls == measured and [m.candidate.label for m in choice.measured] == measured
    assert f"picked {picked}" in choice.summary()
    for label in measured[:-1]:  # why the cheaper ones were passed over
        assert label in choice.summary() and label in choice.table()
    args = choice.compile_args()
    assert args[:2] == ["--quantize", picked.split()[0]]


def test_measure_all_keeps_the_cheapest_choice_and_fills_the_table():
    calls: list[str] = []
    choice = choose_by_perplexity(5.0, measured_from(PERPLEXITY, calls), measure_all=True)
    assert choice.chosen.label == "w4bf16 g64" and len(calls) == 4
    assert choice.table().count("yes") == 3 and choice.table().count(" no") == 1
    data = choice.to_json()
    assert data["chosen"] == {"quantize": "w4bf16", "q_group_size": 64}
    assert data["measured"][0]["increase_percent"] == pytest.approx(6.0)


def test_no_mode_within_the_bound_chooses_none():
    calls: list[str] = []
    choice = choose_by_perplexity(0.5, measured_from(PERPLEXITY, calls))
    assert choice.chosen is None and len(calls) == 4 and choice.compile_args() == []
    assert choice.summary().startswith("no mode keeps the perplexity within +0.5%")


def test_a_better_perplexity_than_transformers_is_within_any_bound():
    calls: list[str] = []
    choice = choose_by_perplexity(0.0, measured_from(dict(PERPLEXITY, **{"w4bf16 g128": 19.9}), calls))
    assert choice.chosen.label == "w4bf16 g128" and choice.measured[0].increase_percent < 0


def test_a_negative_bound_is_refused():
    with pytest.raises(UsageError, match="max_ppl_increase must be a percentage >= 0"):
        choose_by_perplexity(-1.0, measured_from(PERPLEXITY, []))


def test_cli_max_ppl_increase_needs_quantize_auto(tmp_path):
    r = CliRunner().invoke(app, ["compile", str(tmp_path), "--quantize", "bf16", "--max-ppl-increase", "1"])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        "error: --max-ppl-increase chooses the mode itself: use it with --quantize auto, not bf16"]


def test_a_group_size_that_does_not_divide_the_hidden_size_is_not_measured():
    calls: list[str] = []
    # SmolLM2: hidden 576 = 9 x 64, not a multiple of 128
    choice = choose_by_perplexity(5.0, measured_from(PERPLEXITY, calls), hidden_size=576)
    assert calls == ["w4bf16 g64"] and choice.chosen.label == "w4bf16 g64"
    assert choice.skipped == ["w4bf16 g128: 128 does not divide the hidden size 576"]
    assert "not measured: w4bf16 g128" in choice.table()
    calls.clear()
    assert choose_by_perplexity(10.0, measured_from(PERPLEXITY, calls), hidden_size=1024).chosen.label == "w4bf16 g128"
