"""Soak test of workflows-celery: recipe runs through killed workers and a restarted broker.

``python -m soak --help`` lists its options, and :mod:`soak.run` describes what it does.
"""
