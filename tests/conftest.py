"""Suite-wide rules: offline, the ci profile, and notebooks compared fairly."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent

# Set before anything starts a kernel or imports HF libraries.
os.environ["LQ_PROFILE"] = os.environ.get("LQ_PROFILE_TEST", "ci")
os.environ["LQ_NO_NETWORK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TQDM_DISABLE"] = "1"  # progress bars never decide a test
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE / "netguard"), os.environ.get("PYTHONPATH")]))
# Kernels must run this interpreter (the venv), whatever is first on PATH.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

from lq_edu import _netguard  # noqa: E402

_netguard.install()


def _drop_stderr(outputs):
    """Progress bars and warnings go to stderr; they never decide a checked cell."""
    return [o for o in outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]


try:  # nbval compares stderr streams too; filter them out of both sides
    from nbval import plugin as _nbval

    _compare = _nbval.IPyNbCell.compare_outputs

    def _compare_without_stderr(self, test, ref, skip_compare=None):
        return _compare(self, _drop_stderr(test), _drop_stderr(ref), skip_compare)

    _nbval.IPyNbCell.compare_outputs = _compare_without_stderr
except ImportError:
    pass


@pytest.fixture(scope="session")
def course_model():
    from lq_edu import load_course_model

    return load_course_model()
