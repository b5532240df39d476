"""Profiles and the device helper."""

from __future__ import annotations

import pytest
import torch

from lq_edu import PROFILES, environment_report, get_profile, memory_info, pick_device


def test_profiles_grow_from_ci_to_gpu():
    ci, laptop, gpu = PROFILES["ci"], PROFILES["laptop"], PROFILES["gpu"]
    for field in ("eval_tokens", "train_steps", "calib_samples"):
        assert getattr(ci, field) < getattr(laptop, field) < getattr(gpu, field), field


def test_profile_from_environment(monkeypatch):
    monkeypatch.setenv("LQ_PROFILE", "laptop")
    assert get_profile().name == "laptop"
    assert get_profile("CI").name == "ci"
    monkeypatch.delenv("LQ_PROFILE")
    assert get_profile().name == "laptop"


def test_unknown_profile_lists_the_valid_ones():
    with pytest.raises(ValueError, match="use one of: ci, laptop, gpu"):
        get_profile("huge")


def test_pick_device_reports_its_choice(capsys, monkeypatch):
    monkeypatch.delenv("LQ_DEVICE", raising=False)
    device = pick_device()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert device.type == expected
    assert capsys.readouterr().out.startswith(f"Using device: {expected}")


def test_forced_device(monkeypatch):
    monkeypatch.setenv("LQ_DEVICE", "cpu")
    assert pick_device(verbose=False) == torch.device("cpu")
    monkeypatch.setenv("LQ_DEVICE", "tpu")
    with pytest.raises(ValueError, match="not a device"):
        pick_device(verbose=False)
    if not torch.cuda.is_available():
        monkeypatch.setenv("LQ_DEVICE", "cuda")
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device(verbose=False)


def test_memory_info_is_sane():
    mem = memory_info("cpu")
    assert 0 < mem.free_bytes <= mem.total_bytes
    assert "GiB free of" in str(mem)


def test_environment_report_passes_here(capsys):
    rows = environment_report()
    failed = [r.item for r in rows if not r.ok]
    assert not failed, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "PASS  torch" in out and "course model" in out


def test_environment_report_flags_low_memory(capsys):
    rows = environment_report(min_free_gib=1e9, show=True)
    mem = next(r for r in rows if r.item == "free memory")
    assert not mem.ok
    assert "FAIL  free memory" in capsys.readouterr().out
