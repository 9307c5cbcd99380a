"""Packaging marker: lets `find_packages` ship this `evaluate` module folder in wheels."""
