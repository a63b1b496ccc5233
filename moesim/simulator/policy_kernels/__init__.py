"""Compiled replay of every built-in policy, one module per family of policies.

Every kernel runs the mechanism of :class:`moesim.policies.base.ExpertCache` (docs/semantics.md) over
array state (``state``): per row, count hits, *access* every key in router order, then for each missing key
*evict until room* (the policy's victim, never a key of the row) and *insert*: that loop is written once,
``loop.request_loop`` (``arc``, ``s3fifo``, ``hobbit`` and ``randomized`` still write it out: on the shared
loop they ran at 0.3-0.9x, docs/policies.md). Each family
holds only its own rules and ordering state, handed to the loop, and
implements the classes in ``moesim.policies.eviction`` step for step
(tests/test_compiled_policies.py checks every policy, scope and semantics against the classes, hits per
layer):

- ``lists``: lru, fifo, sieve; ``arc``; ``s3fifo`` -- doubly linked lists in arrays;
- ``scores``: lfu, lfu-cache, opt, lfu-decay, gate-weighted, lrfu -- per-key values, the lowest score
  goes (a scan, a vector scan or a heap by cache size), and the one-pass stack of all sizes;
- ``hobbit``: ranks of recency and frequency (a scan, rank vectors or the staircase);
- ``randomized``: random, with the class's SplitMix64;
- ``least_stale`` (a list), ``lfru`` and ``mrs`` (a scan of the slots).

``registry.KERNELS`` maps each name to its kernel, number and parameter packing.
"""
