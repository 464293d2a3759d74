"""Package data: label look-up tables shipped with dlf-bids (read with importlib.resources)."""
