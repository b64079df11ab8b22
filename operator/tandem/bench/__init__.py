"""Planner benchmark: every autoscaling policy on every trace, same catalog, prices and SLO.

``python -m tandem.bench --trace PATH [--trace PATH ...] [--synthetic] --out DIR``
"""
