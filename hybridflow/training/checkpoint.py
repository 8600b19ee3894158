"""Deprecated: moved to :mod:`hybridflow.runs.checkpoint` (issue 30).

This re-export goes in the next release.
"""

from ..runs.checkpoint import *  # noqa: F403
from ..runs.checkpoint import __all__  # noqa: F401
