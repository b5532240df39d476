"""Loaded by every Python process the test suite starts (kernels included).

tests/conftest.py puts this folder on PYTHONPATH; when LQ_NO_NETWORK=1 it
installs the same guard as the test process itself: loopback is allowed
(Jupyter kernels talk to pytest over it), everything else raises.
"""

import os
import sys

if os.environ.get("LQ_NO_NETWORK") == "1":
    _root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, _root)  # find lq_edu even when it is not pip-installed
    try:
        from lq_edu._netguard import install

        install()
    finally:
        sys.path.remove(_root)
