"""DAS: dynamic architecture skipping (Wu et al., NeurIPS 2023).

An RL policy (:class:`SkipPolicy`) scores each candidate unit; the k most redundant units
are replaced by skip adapters (:class:`vlkit.nn.adapters.SkipAdapter`) and the kept ones get
parallel adapters (:func:`vlkit.nn.adapters.add_adapters`).
"""

from .policy import SkipPolicy, reward_from_loss, sample_distinct

__all__ = ["SkipPolicy", "sample_distinct", "reward_from_loss"]
from .apply import (SCOPES, SkippableUnit, SkipSupernet, adapter_slots, apply_das, apply_skips, candidates, das_trainable,
                    skip_bottleneck_for)
from .search import DASModel, SearchResult, ValBatches, search

__all__ += ["SCOPES", "candidates", "adapter_slots", "skip_bottleneck_for", "apply_skips", "apply_das", "das_trainable",
            "SkippableUnit", "SkipSupernet", "DASModel", "SearchResult", "ValBatches", "search"]
