"""Objective, jitted train step, optimizer, state, checkpoints and the training loop."""
