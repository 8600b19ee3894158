"""Deprecated: moved to :mod:`hybridflow.runs.config` (issue 30).

This re-export goes in the next release.
"""

from ..runs.config import *  # noqa: F403
from ..runs.config import __all__  # noqa: F401
