"""Filters: choose samples from raw shards and write DataComp uid lists, with a report.

``qcap filter basic|clip-score|dedup --shards RAW --out UIDS.npy ...`` (see :mod:`curate.filters.cli`).
Modules: ``config`` (the commands' configs, light), ``base`` (``BaseFilter`` and the runner that
counts, writes uids, decisions and the report), ``report`` (histograms), ``basic`` (DataComp's
basic filter), ``clip_score`` (image–text similarity on Ray Data), ``dedup`` (exact and
near-duplicates). Choosing never rewrites images; ``qcap reshard`` (:mod:`curate.reshard`)
applies a uid list, ``qcap uids`` (:mod:`curate.uidtool`) combines them.
"""
