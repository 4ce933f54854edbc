"""Complexity and latency measurement (``segkd bench``)."""
