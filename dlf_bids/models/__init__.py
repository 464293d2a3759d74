"""Learned segmentation models (plain PyTorch + MONAI; no nipype imports here).

The public names of each module are re-exported here; each module's ``__all__`` is the one list.
"""

from . import dlf, inference, model_file, training, unet
from .dlf import *  # noqa: F401,F403
from .inference import *  # noqa: F401,F403
from .model_file import *  # noqa: F401,F403
from .training import *  # noqa: F401,F403
from .unet import *  # noqa: F401,F403

__all__ = [*dlf.__all__, *inference.__all__, *model_file.__all__, *training.__all__, *unet.__all__]
