"""The worker runtime: entry point, serve loop, transport, limits, calls back to the host.

Imports no host code and no asyncio (an import-linter contract enforces it).
"""
