"""Former home of the training helpers, kept importable: every public name of :mod:`storygptv.training`.

The helpers moved into the package :mod:`storygptv.training` (one module per concept) and now take
explicit values instead of the scripts' argparse namespace, e.g.
``find_resume_checkpoint(args.resume_from_checkpoint, args.output_dir, settings, overwrite=...)``;
``from storygptv.training_utils import save_checkpoint`` keeps working for the names, and new code
imports from the modules (``from storygptv.training.checkpoints import save_checkpoint``).
"""

from __future__ import annotations

from .training import *  # noqa: F403
from .training import __all__  # noqa: F401  (the same public names)
