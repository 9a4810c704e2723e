"""Soak test of workflows-celery: recipe runs through killed workers and a restarted broker.

``python -m soak --help`` tells how to run it; :mod:`soak.run` describes what it does.
"""
