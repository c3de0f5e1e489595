"""Benchmarks of the alert service: latency, load, coalescing, cost to the database, many alerts, big results.

Run `python -m bench` (full sizes, a few minutes) or `python -m bench --quick` (tiny sizes, seconds).
"""
