"""qcap's finetune stage."""
