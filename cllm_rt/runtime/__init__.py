"""The decoding runtime: the paged KV cache, block attention routing and the exact greedy loop.

Imports nothing from :mod:`cllm_rt.training` or :mod:`cllm_rt.demo`.
"""
