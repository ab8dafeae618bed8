"""Benchmarks for the sidecar: ``python -m tests.bench`` (``make bench``); see BENCHMARKS.md.

Every case is measured side by side with its baseline in the same run, because the
machine is shared and absolute numbers drift: the ratios are what the targets check.
"""
