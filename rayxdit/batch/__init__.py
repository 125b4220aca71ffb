"""Batch dataset generation: ``python -m rayxdit.batch`` (see :mod:`rayxdit.batch.job`)."""
