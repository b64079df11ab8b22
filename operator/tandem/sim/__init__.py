"""Fleet simulator (trace replay on prefill / decode / mixed pools), its policies and the
fleet planner. The simulated HTTP worker lives in ``tandem.sim.worker``."""
