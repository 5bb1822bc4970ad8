"""Benchmarks behind ``idm3d bench``: each prints a markdown table or JSON lines, never a test verdict.

``harness`` holds the shared machinery (fresh-subprocess runs, memory/time/FLOP/energy
measurement, markdown, JSON, plots); ``core``, ``attention``, ``memory`` and ``max_size`` are the
sub-commands, each exposing ``add_arguments(parser)`` and ``run(args) -> int``.
"""
