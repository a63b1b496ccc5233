"""moesim: a lab for Mixture-of-Experts expert offloading.

Data flows one way: recorder -> traces -> simulator -> analysis. ``moesim.policies`` imports
none of the other subpackages, so the simulator and the real GPU engine can share its classes.
"""

__version__ = "0.1.0"
