"""The demo recipe's reports: ``qcap report`` (``make demo``) and ``qcap science-report`` (``make science``).

The Makefile is the recipe; this package reads what it writes. It computes no metric: every
number in a report comes from a stage's output file, named in the report's JSON.
"""
