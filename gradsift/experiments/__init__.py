"""Experiments: each one command, one ``summary.json``, one table and one picture."""
