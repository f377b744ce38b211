"""Replay selection under a compute budget: strategies, scoring, planner, the CPT suite."""
