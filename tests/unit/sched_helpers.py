"""Builders shared by the scheduler unit tests."""

from __future__ import annotations

from preble_hpc.rank0_scheduler.policy import PolicyInput


def make_input(
    ranks=(1, 2, 3),
    prompt=1000,
    cached=None,
    load=None,
    prefill_per_token=1e-3,
    evict=None,
    hit_ratio=None,
    **over,
) -> PolicyInput:
    """Per-rank cached tokens ``cached``; ``P`` = 1 ms per missing token; ``M`` from ``evict``."""
    cached = cached or {}
    load = load or {}
    evict = evict or {}
    hit_ratio = hit_ratio or {}
    fields = dict(
        ranks=list(ranks),
        prompt_tokens=prompt,
        max_tokens=16,
        per_rank_cached=cached,
        cached=max(cached.values(), default=0),
        load={r: load.get(r, 0.0) for r in ranks},
        in_flight={r: 0 for r in ranks},
        waiting={r: 0 for r in ranks},
        kv_usage={r: 0.0 for r in ranks},
        hit_ratio={r: hit_ratio.get(r, 0.0) for r in ranks},
        tree_tokens={r: 0 for r in ranks},
        block_size={r: 16 for r in ranks},
        active_prefill_tokens={r: 0 for r in ranks},
        active_blocks={r: 0 for r in ranks},
        prefill_cost=lambda r: (prompt - cached.get(r, 0)) * prefill_per_token,
        eviction_cost=lambda r: evict.get(r, 0.0),
    )
    fields.update(over)
    return PolicyInput(**fields)
