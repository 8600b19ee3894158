"""Deprecated: moved to :mod:`hybridflow.experiments.grid` (issue 30).

This re-export goes in the next release.
"""

from ..experiments.grid import *  # noqa: F403
from ..experiments.grid import __all__  # noqa: F401
