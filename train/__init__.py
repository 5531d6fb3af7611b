"""qcap's train stage."""
