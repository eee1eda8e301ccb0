"""The training library of ``storygptv``: what the scripts of ``training_scripts/`` share.

The scripts read top to bottom like the diffusers training examples; what two of them share lives here,
in functions that take explicit values (a script unpacks its ``args`` where it calls them). One concept per
module:

======================= ==============================================================================
module                  what
======================= ==============================================================================
``arguments``           the shared command line (the one module that reads an argparse namespace)
``checks``              ``TrainingSetupError`` and the checks that run before any long work
``accelerate_setup``    the ``Accelerator``, trackers, logging, weight dtypes
``data``                the stories, the resumable batch order, per-batch collator seeds
``loop``                the one loop idiom: optimizer (fused AdamW), LR schedule semantics, optimizer
                        step, micro-step seeding, step logging, EMA
``diffusion``           latents (and their cache), noise, targets, denoising loss, min-SNR
``checkpoints``         save (partial folder, completed, renamed, pruned), inspect, load
``resume``              ``latest`` with fallback, settings check, where a resumed run continues
``references``          the cast of a run (cast folders, built-in references) and the exported one
``target_encoding``     stage-2 targets of story rows, encoded with the frozen Char-LDM
``targets``             the stage-2 targets folder: format, resumable computation, loading
``stage2``              stage 2's collator, L_img, checkpoint hooks, validation and checks
``model_cards``         the model card of every exported folder (templates in ``storygptv/hub_cards``)
``hub``                 local paths scrubbed from configs, upload to the Hub
======================= ==============================================================================

Every public name is also importable from this package (``from storygptv.training import
save_checkpoint``); new code imports from the modules.
"""

from __future__ import annotations

from . import (
    accelerate_setup,
    arguments,
    checkpoints,
    checks,
    data,
    diffusion,
    hub,
    loop,
    model_cards,
    references,
    resume,
    stage2,
    target_encoding,
    targets,
)
from .accelerate_setup import *  # noqa: F403
from .arguments import *  # noqa: F403
from .checkpoints import *  # noqa: F403
from .checks import *  # noqa: F403
from .data import *  # noqa: F403
from .diffusion import *  # noqa: F403
from .hub import *  # noqa: F403
from .loop import *  # noqa: F403
from .model_cards import *  # noqa: F403
from .references import *  # noqa: F403
from .resume import *  # noqa: F403
from .stage2 import *  # noqa: F403
from .target_encoding import *  # noqa: F403
from .targets import *  # noqa: F403

#: The modules of the package, in the order of the table above.
MODULES = (
    arguments,
    checks,
    accelerate_setup,
    data,
    loop,
    diffusion,
    checkpoints,
    resume,
    references,
    target_encoding,
    targets,
    stage2,
    model_cards,
    hub,
)

__all__ = sorted(name for module in MODULES for name in module.__all__)
