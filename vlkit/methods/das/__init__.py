"""DAS: dynamic architecture skipping (Wu et al., NeurIPS 2023).

An RL policy (:class:`SkipPolicy`) scores each candidate unit; the k most redundant units
are replaced by skip adapters (:class:`vlkit.nn.adapters.SkipAdapter`) and the kept ones get
parallel adapters (:func:`vlkit.nn.adapters.add_adapters`).
"""

from .policy import SkipPolicy, reward_from_loss, sample_distinct

__all__ = ["SkipPolicy", "sample_distinct", "reward_from_loss"]
