"""Measurement and documentation scripts, and the yardsticks they use (not shipped).

Run each as a module from the repository root, e.g. ``python -m scripts.benchmark``.
"""
