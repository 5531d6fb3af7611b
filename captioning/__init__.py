"""qcap's captioning stage."""
