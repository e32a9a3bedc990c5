"""Consistency training: Jacobi trajectory collection, their storage, the losses and the training run.

Builds on :mod:`cllm_rt.runtime` (trajectories are decoded with the runtime's cache and Jacobi step);
never imports :mod:`cllm_rt.demo`.
"""
