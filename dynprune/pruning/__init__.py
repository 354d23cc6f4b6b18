"""Static pruning: importance criteria (``importance``), width selection against a FLOPs or
parameter target (``select``), physical channel removal (``surgery``), and EFFP (``effp``).

Only the hidden channels of the bottlenecks are pruned (the same channels the gates skip):
produced and consumed inside a block, never part of a residual add, a concat or the head,
so removing them needs no dependency graph and is provably exact.
"""
