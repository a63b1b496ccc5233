"""The offloaded MoE runtime (real copies, real compute) driven by ``moesim.policies``.

It lives beside ``moesim.simulator`` as a second *consumer* of ``policies/``: it replays a trace's routing
through the very same ExpertCache and policy classes, but moves real bytes over PCIe and runs real
kernels, so that the simulator's predictions can be checked against it. ``policies/`` never imports it.
"""

from moesim.engine.plan import CachePlan, Routing
from moesim.engine.quant import QUANTS, QuantSpec, quant_spec

__all__ = ["CachePlan", "QUANTS", "QuantSpec", "Routing", "quant_spec"]
