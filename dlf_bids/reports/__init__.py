"""Per-subject HTML reports (``OUTPUT_DIR/sub-<label>.html``), their figures and the citations."""
