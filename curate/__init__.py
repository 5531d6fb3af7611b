"""qcap's curate stage: download, filters, dedup, resharding, subsets and uid algebra.

It builds on the ground floor (:mod:`base`) and imports no other stage.
"""
