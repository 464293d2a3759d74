"""dlf-bids: brain MRI segmentation as a BIDS-App (multi-atlas label fusion and learned methods)."""

import os

__version__ = "0.1.0"
__all__ = ["__version__"]

# dlf-bids never goes to the network (clusters often have none): Nipype would otherwise ask
# etelemetry for its latest version when the first interface is made (fMRIPrep turns it off too).
os.environ.setdefault("NIPYPE_NO_ET", "1")
