"""Sweeps: the search space, the plan, PBT's population, the Ray Tune adapter, the report."""
