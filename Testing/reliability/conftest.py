"""Fixtures of the reliability tests (``tiny_models`` is shared, in Testing/conftest.py); helpers are in
reliability_tools.py."""
