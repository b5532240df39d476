"""lq_edu: the engine behind the lq-edu course.

Each module is one concept from the course, in the order the lessons meet it:

- ``paths``: where the kit keeps data and the course model
- ``device``: pick cuda > mps (opt-in) > cpu; memory and environment checks
- ``corpus``: the course corpus (Python 3.11 docs), loaded through ``datasets``
- ``models``: load the course model (or any local HF causal LM), count parameters
- ``evaluate``: held-out perplexity and greedy generation
- ``pretrain``: rebuild the course model's tokenizer and weights from the corpus
- ``profiles``: ci / laptop / gpu sizes for every lesson
- ``check``: self-checks that compare a learner's function with the engine's
- ``notebooks``: student copies, their sync check, and the headless course runner
"""

from lq_edu.check import CheckResult, check
from lq_edu.corpus import load_corpus
from lq_edu.device import environment_report, memory_info, pick_device
from lq_edu.evaluate import generate, perplexity
from lq_edu.models import count_parameters, load_course_model, parameter_bytes, parameter_report
from lq_edu.paths import CORPUS_DIR, COURSE_MODEL_DIR, DATA_DIR
from lq_edu.profiles import PROFILES, Profile, get_profile

__version__ = "0.1.0"

__all__ = [
    "COURSE_MODEL_DIR",
    "CORPUS_DIR",
    "DATA_DIR",
    "PROFILES",
    "CheckResult",
    "Profile",
    "check",
    "count_parameters",
    "environment_report",
    "generate",
    "get_profile",
    "load_corpus",
    "load_course_model",
    "memory_info",
    "parameter_bytes",
    "parameter_report",
    "perplexity",
    "pick_device",
]
