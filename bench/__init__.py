"""Benchmarks: ``python -m bench [--quick]`` runs every module here (see ``__main__``)."""
