"""Prefect tasks: thin wrappers (retries, caching, artifacts) over liveavatar_core functions."""
