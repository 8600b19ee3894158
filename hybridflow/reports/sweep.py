"""Deprecated: moved to :mod:`hybridflow.experiments.sweep` (issue 30).

This re-export goes in the next release.
"""

from ..experiments.sweep import *  # noqa: F403
from ..experiments.sweep import __all__  # noqa: F401
