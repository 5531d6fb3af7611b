"""Download a DataComp-style pool into raw shards: img2dataset fetches, qcap makes it dependable.

``qcap download --pool POOL --out RAW`` (see :mod:`curate.download.run`). The package:

- :mod:`~curate.download.config` — ``DownloadConfig`` (DataComp's defaults);
- :mod:`~curate.download.plan` — pool checks, fingerprint, shard slicing;
- :mod:`~curate.download.guard` — URL/address policy, body and time bounds (a urllib opener);
- :mod:`~curate.download.status` — the status vocabulary and img2dataset's messages mapped onto it;
- :mod:`~curate.download.fetch` — one shard through img2dataset's ``Downloader``, written by qcap;
- :mod:`~curate.download.distribute` — local processes or Ray tasks, bounded, with shard retries;
- :mod:`~curate.download.merge` — ``--retry-failed``: patch, merge, commit (journal-style);
- :mod:`~curate.download.manifest` — ``manifest.json``, the one-screen summary.
"""
