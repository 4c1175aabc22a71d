"""The benchmark harness: ``python -m bench SCENARIO``; see ``bench.cli``."""
