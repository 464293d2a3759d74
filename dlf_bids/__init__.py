"""dlf-bids: brain MRI segmentation as a BIDS-App (multi-atlas label fusion and learned methods)."""

import os

__version__ = "0.1.0"
__all__ = ["__version__"]

# dlf-bids never goes to the network (clusters often have none). Applied on import, so that any
# use of the package (the commands, tests, a notebook) is covered; values a user set are kept.
OFFLINE = {
    # nipype asks rig.mit.edu for a newer version (etelemetry, sending CI details) when the main
    # process builds its first interface; a run must not depend on, or report to, a server
    "NIPYPE_NO_ET": "1",
    # templateflow may fetch an updated skeleton; --output-spaces reads templates from
    # TEMPLATEFLOW_HOME only, never fetching them
    "TEMPLATEFLOW_AUTOUPDATE": "0",
}
for _name, _value in OFFLINE.items():
    os.environ.setdefault(_name, _value)
