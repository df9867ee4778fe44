"""medfed."""
