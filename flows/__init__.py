"""Prefect flows composing the tasks, and the ``cleancompact`` command line."""
