"""Benchmarks of workflows-celery against plain Celery and python-workflows.

``python -m benchmarks`` pushes messages through the same three-step pipeline
on each system, one after the other on the same machine and broker, and
prints throughput, per-hop latency, bytes on the wire and worker memory.
docs/benchmarks.md contains the results and how to read them.
"""
