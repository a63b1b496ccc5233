"""Hit-rate replay, all-sizes curves and the discrete-event timing simulator."""
