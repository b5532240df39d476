"""Run profiles: the same notebook, sized for CI, a laptop or a GPU.

Every lesson's first code cell (tagged ``parameters``) reads ``LQ_PROFILE``
and asks this module what that profile means, so that CI, papermill and a
learner all run the identical code, only smaller or larger.

| profile | for | budget per lesson |
|---|---|---|
| ci | the test suite on 2 CPU cores, no network | under 90 s |
| laptop | a learner's CPU laptop (the default) | under 5 min |
| gpu | a CUDA GPU; may name a hub model | minutes |
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lq_edu.paths import COURSE_MODEL_DIR


@dataclass(frozen=True)
class Profile:
    """How big a lesson runs. Lessons read these instead of hard-coding sizes."""

    name: str
    description: str
    eval_tokens: int  # held-out tokens used for perplexity
    train_steps: int  # optimizer steps in training demos
    calib_samples: int  # calibration sequences
    max_new_tokens: int  # tokens per generated sample
    model: str = str(COURSE_MODEL_DIR)  # folder (or, for gpu, a hub name) of the base model
    seed: int = 0


PROFILES: dict[str, Profile] = {
    "ci": Profile("ci", "smallest sizes, for the test suite on 2 CPU cores", 8_192, 60, 16, 24),
    "laptop": Profile("laptop", "a learner's CPU laptop", 32_768, 300, 64, 48),
    "gpu": Profile("gpu", "a CUDA GPU", 105_000, 1_000, 128, 64),
}


def get_profile(name: str | None = None) -> Profile:
    """The profile called ``name``, else ``$LQ_PROFILE``, else ``laptop``."""
    name = name or os.environ.get("LQ_PROFILE") or "laptop"
    key = name.strip().lower()
    if key not in PROFILES:
        raise ValueError(f"profile {name!r} is unknown; use one of: {', '.join(PROFILES)} (e.g. LQ_PROFILE=ci)")
    return PROFILES[key]
