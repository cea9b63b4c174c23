"""vlkit: efficient transfer learning of vision-language and language models.

Methods: DAS (layer skipping), EfficientVLM (distil + prune), SHERL (memory-efficient
tuning), behind one backbone protocol (:mod:`vlkit.models.protocol`).
"""

import os as _os

# The kit never reaches for a model or dataset hub: offline is the normal mode.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"
