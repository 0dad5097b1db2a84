"""Helpers for tests and benchmarks that build random diffusers / transformers folders.

They need the test extra (torch, diffusers, transformers): nothing in the
library imports them.
"""
