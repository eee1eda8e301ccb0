"""Publishing helpers, re-exported for the training scripts (their home: :mod:`storygptv.hub`)."""

from ..hub import *  # noqa: F403
from ..hub import __all__  # noqa: F401
