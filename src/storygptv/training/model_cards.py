"""The model-card writer, re-exported for the training scripts (its home: :mod:`storygptv.model_cards`)."""

from ..model_cards import *  # noqa: F403
from ..model_cards import __all__  # noqa: F401
