"""Aggregators across ranks (torch.distributed): :class:`GlobalAggregation`.

The runner lives with the aggregators (:mod:`gradsift.aggregate.sharded`): it asks each
stage for its sharded form and never switches on its name. This module keeps the
distributed package's name for it.
"""

from __future__ import annotations

from ..aggregate.sharded import MODES, GlobalAggregation, Mode

__all__ = ["GlobalAggregation", "Mode", "MODES"]
