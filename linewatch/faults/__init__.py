"""Fault injection: real lines with one fault each, and the invariant they must keep.

``linewatch faults`` and ``tests/test_faults.py`` run the same scenarios
(:mod:`linewatch.faults.scenarios`).
"""
