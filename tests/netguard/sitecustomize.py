"""Loaded by every Python process the test suite starts (kernels included).

tests/conftest.py puts this folder on PYTHONPATH; when LQ_NO_NETWORK=1 it
installs the same guard as the test process itself: loopback is allowed
(Jupyter kernels talk to pytest over it), everything else raises.
"""

import os

if os.environ.get("LQ_NO_NETWORK") == "1":
    try:
        from lq_edu._netguard import install

        install()
    except ImportError:  # lq_edu not importable in this interpreter: nothing to guard
        pass
