"""Score-distillation methods as small ``ScoreDistiller`` classes; importable as ``disback_core.adapters``.

Each composes the core's sigma samplers, DSM loss and normaliser, and takes the target denoiser
as an argument, so DisBack can replace the teacher with a trajectory node.
"""

from .diff_instruct import DiffInstruct
from .dmd2 import DMD2
from .gdd import GDD
from .sid import SiD

__all__ = ["DiffInstruct", "DMD2", "GDD", "SiD"]
