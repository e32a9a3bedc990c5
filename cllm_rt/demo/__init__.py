"""``cllm-rt demo``: the whole pipeline (data → target → trajectories → CLLM → evaluation) on real data.

The top room: it may import everything below it; nothing outside the CLI imports it.
"""
