"""dlf-bids: brain MRI segmentation as a BIDS-App (multi-atlas label fusion and learned methods)."""

__version__ = "0.1.0"
__all__ = ["__version__"]
