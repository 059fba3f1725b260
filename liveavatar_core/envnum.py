"""Positive numbers read from environment variables, with a default for unset or nonsense values."""

import os


def positive_seconds(name: str, default: float) -> float:
    """$name as a positive number of seconds; `default` when unset, unparsable or not positive."""
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default
