"""Mixed-precision bit allocation under a memory budget."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from lq_edu.allocate import (
    AllocationPlan,
    Candidate,
    Measured,
    allocate_bits,
    measure_errors,
    plan_bytes,
    relative_error,
)
from lq_edu.quant_linear import QuantLinear

CANDIDATES = [Candidate(f, b) for f in ("nf2", "nf3", "nf4") for b in (64, 128)]


def _random_table(seed: int, layers: int = 5, options: int = 3) -> dict[str, list[Measured]]:
    g = torch.Generator().manual_seed(seed)
    table = {}
    for i in range(layers):
        sizes = (torch.randint(10, 100, (options,), generator=g)).tolist()
        errors = torch.rand(options, generator=g).tolist()
        table[f"l{i}"] = [
            Measured(Candidate("nf4", 2 ** (4 + k)), s, e) for k, (s, e) in enumerate(zip(sizes, errors, strict=True))
        ]
    return table


def _brute_force(table, budget):
    best = None
    for combo in itertools.product(*table.values()):
        if sum(m.bytes for m in combo) <= budget:
            err = sum(m.error for m in combo)
            best = err if best is None or err < best else best
    return best


@pytest.mark.parametrize("seed", range(6))
def test_milp_is_optimal_and_greedy_is_bounded(seed):
    table = _random_table(seed)
    smallest = sum(min(m.bytes for m in row) for row in table.values())
    largest = sum(max(m.bytes for m in row) for row in table.values())
    for budget in (smallest, (smallest + largest) // 2, largest):
        exact = allocate_bits(table, budget, solver="milp")
        assert exact.total_bytes <= budget
        assert exact.total_error == pytest.approx(_brute_force(table, budget), abs=1e-9)
        greedy = allocate_bits(table, budget, solver="greedy")
        assert greedy.total_bytes <= budget
        # the LP bound sits below every feasible plan, and the gap covers the greedy's shortfall
        assert greedy.lower_bound <= exact.total_error + 1e-9
        assert greedy.total_error - greedy.gap <= exact.total_error + 1e-9


def test_budget_below_minimum_names_the_minimum():
    table = {"a": [Measured(Candidate("nf2"), 100, 1.0), Measured(Candidate("nf4"), 200, 0.1)]}
    with pytest.raises(ValueError, match=r"smallest possible plan, 100 bytes \(0\.000 MiB\)"):
        allocate_bits(table, 99)
    with pytest.raises(ValueError, match="positive"):
        allocate_bits(table, 0)
    assert allocate_bits(table, 100).choices["a"].candidate == Candidate("nf2")
    assert allocate_bits(table, 10**6).choices["a"].candidate == Candidate("nf4")
    with pytest.raises(ValueError, match="not a known format"):
        Candidate("nf5")


def test_relative_error_weighting():
    W, W_hat = torch.ones(2, 3), torch.ones(2, 3)
    W_hat[:, 0] = 0  # error only in channel 0
    assert relative_error(W, W_hat) == pytest.approx(1 / 3)
    assert relative_error(W, W_hat, torch.tensor([0.0, 1.0, 1.0])) == 0.0


def test_mixed_beats_uniform_3bit_perplexity(course_model):
    """The target: at the bytes uniform nf3 (block 64) takes, the mixed plan's perplexity is no worse."""
    from lq_edu import load_corpus, perplexity, quantize_model

    model, tokenizer = course_model
    val = load_corpus("validation")["text"]
    table = measure_errors(model, CANDIDATES)
    budget = plan_bytes(table, Candidate("nf3", 64))
    plan = allocate_bits(table, budget)
    assert isinstance(plan, AllocationPlan) and plan.solver == "milp" and plan.total_bytes <= budget
    assert len(plan.counts()) > 1  # it really mixes
    text = plan.table()
    assert "model.layers.0.mlp.down_proj" in text and "total" in text

    mixed = copy.deepcopy(model)
    plan.apply(mixed)
    uniform = copy.deepcopy(model)
    report = quantize_model(uniform, "nf3", 64)
    assert report.linear_bytes_after == budget  # true bytes on both sides
    mixed_bytes = sum(m.qweight.nbytes for m in mixed.modules() if isinstance(m, QuantLinear))
    assert mixed_bytes == plan.total_bytes <= report.linear_bytes_after
    ppl_mixed = perplexity(mixed, tokenizer, val, max_tokens=12288, progress=False)
    ppl_uniform = perplexity(uniform, tokenizer, val, max_tokens=12288, progress=False)
    assert ppl_mixed <= ppl_uniform, (ppl_mixed, ppl_uniform)


def test_apply_is_atomic(course_model):
    model = copy.deepcopy(course_model[0])
    name = "model.layers.0.self_attn.q_proj"
    table = measure_errors(model, [Candidate("nf4")], names=[name, "model.layers.0.self_attn.k_proj"])
    plan = allocate_bits(table, 10**9)
    with torch.no_grad():
        model.get_submodule("model.layers.0.self_attn.k_proj").weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        plan.apply(model)
    assert not isinstance(model.get_submodule(name), QuantLinear)  # nothing was swapped in
