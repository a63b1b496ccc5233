"""The offloaded MoE runtime (real copies, real compute) driven by ``moesim.policies``.

It lives beside ``moesim.simulator`` as a second *consumer* of ``policies/``: the very same ExpertCache
and policy classes decide residency (``plan.CachePlan``), but real bytes move over PCIe and real kernels
run, so that the simulator's predictions can be checked against it. ``policies/`` never imports it.

Two engines share the plan: the replay runtime (``runtime``: Mixtral geometry, random weights, routing
forced from a trace) and the offloaded decoder (``checkpoint`` -> ``pack`` -> ``store`` +
``decoder_program`` -> ``decode``; ``recording``): a real checkpoint whose gates drive the routing.
"""

from moesim.engine.plan import CachePlan, Routing
from moesim.engine.quant import QUANTS, QuantSpec, quant_spec

__all__ = ["CachePlan", "QUANTS", "QuantSpec", "Routing", "quant_spec"]
