"""qcap's curate stage: the embedded pool, download, filters, dedup, resharding.

Also home of what every stage shares (curate imports no other stage): the shard module
(:mod:`curate.shards`), the config convention (:mod:`curate.config`) and the CLI plumbing
(:mod:`curate.cli`).
"""
