"""Synthetic CT studies with their ground truth (``phantom``): training data, tests and the demo."""
