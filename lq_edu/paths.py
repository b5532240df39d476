"""Where the kit keeps its files: one place, so lessons and tests agree.

``LQ_DATA_DIR`` overrides the data folder (e.g. for an instructor's shared copy).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("LQ_DATA_DIR", REPO_ROOT / "data"))
CORPUS_DIR = DATA_DIR / "corpus"
MODELS_DIR = DATA_DIR / "models"
COURSE_MODEL_NAME = "lq-course-llama"
COURSE_MODEL_DIR = MODELS_DIR / COURSE_MODEL_NAME
