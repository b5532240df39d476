"""The exercise self-check: right verdicts, useful messages, never raises."""

from __future__ import annotations

import torch

from lq_edu import check


def ref(x):
    return x * 2


def test_passed(capsys):
    result = check(lambda x: x + x, ref, [torch.arange(3.0), 4, 2.5], name="double")
    assert result.passed and bool(result)
    assert "double: ✅ passed" in capsys.readouterr().out


def test_wrong_reports_first_mismatch():
    result = check(lambda x: x * 2 + (x > 1), ref, [torch.arange(4.0)], show=False)
    assert result.status == "wrong" and not result
    assert "output[2] = 5, expected 4" in result.message
    assert "2 of 4 elements differ" in result.message


def test_wrong_shape_type_and_length():
    assert "shape (2,), expected (3,)" in check(lambda x: x[:2] * 2, ref, [torch.ones(3)], show=False).message
    assert "expected a tensor" in check(lambda x: 2.0, ref, [torch.ones(3)], show=False).message
    assert "length 1, expected 2" in check(lambda x: [1], lambda x: [1, 2], [0], show=False).message
    assert "keys" in check(lambda x: {"a": 1}, lambda x: {"b": 1}, [0], show=False).message


def test_not_solved_yet_never_raises(capsys):
    def stub(x):
        raise NotImplementedError("exercise not solved yet")

    result = check(stub, ref, [1])
    assert result.status == "not solved yet"
    assert "not solved yet" in capsys.readouterr().out


def test_learner_error_is_reported_not_raised():
    result = check(lambda x: 1 / 0, ref, [(1,)], show=False)
    assert result.status == "error"
    assert "ZeroDivisionError" in result.message and "case 1" in result.message


def test_inputs_are_cloned_so_in_place_edits_cannot_fool_it():
    def sneaky(x):
        x.mul_(2)  # edits the input, then returns it
        return x

    t = torch.ones(3)
    assert check(sneaky, ref, [t], show=False).passed
    assert torch.equal(t, torch.ones(3))  # the caller's tensor is untouched


def test_kwargs_and_tolerance():
    assert check(lambda a, b: a + b, lambda a, b: a + b + 1e-9, [{"a": 1.0, "b": 2.0}], show=False).passed
    assert not check(lambda a, b: a + b, lambda a, b: a + b + 1e-2, [{"a": 1.0, "b": 2.0}], show=False).passed


def test_no_inputs_is_an_error_verdict():
    assert check(ref, ref, [], show=False).status == "error"
