"""The group level: volume tables across participants."""

from __future__ import annotations

import re
import sys

from ..config import Config
from ..errors import EXIT_OK, MissingInputError


def run_group_level(config: Config) -> int:
    from ..group import group_volumes

    if not config.output_dir.is_dir():
        raise MissingInputError(f"{config.output_dir} does not exist: run the participant level first")
    methods = sorted({re.match(r"seg-([a-zA-Z0-9]+)_dseg\.tsv", p.name).group(1)
                      for p in config.output_dir.glob("seg-*_dseg.tsv")})
    if not methods:
        raise MissingInputError(f"no segmentations in {config.output_dir}: run the participant level first")
    written = 0
    for method in methods:
        try:
            tsv = group_volumes(config.output_dir, method)
        except MissingInputError as err:  # e.g. every participant failed for this method
            print(f"dlf-bids: warning: {err}; no group table for {method}", file=sys.stderr)
            continue
        written += 1
        print(f"group volumes ({method}): {tsv}")
    if not written:
        raise MissingInputError(f"no segmentations in {config.output_dir}: run the participant level first")
    return EXIT_OK
