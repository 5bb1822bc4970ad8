"""Domain (depth) parallelism: one volume split along depth across the ranks of a process group.

``shard(model, group)`` turns a network's depth-coupled layers into their sharded versions in place;
``scatter_depth`` / ``gather_depth`` move between a whole volume and a rank's slices;
``sync_gradients`` sums the parameters' partial gradients once per step. See docs/architecture.md,
"Depth sharding", for where the collectives live.
"""

from __future__ import annotations

from idm3d.domain.comm import CALLS, COUNTER, Domain, gather_depth, scatter_depth
from idm3d.domain.shard import check_shard_depth, counted, halo_bytes, shard, sync_gradients, unshard

__all__ = [
    "CALLS",
    "COUNTER",
    "Domain",
    "check_shard_depth",
    "counted",
    "gather_depth",
    "halo_bytes",
    "scatter_depth",
    "shard",
    "sync_gradients",
    "unshard",
]
