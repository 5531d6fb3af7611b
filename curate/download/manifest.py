"""``RAW/manifest.json``: the totals of a download, recomputed from the shards themselves.

The shards' Parquets (every pool row, failures included) are the truth; the manifest counts
them and checks that they reconcile with the pool: ``pool rows = successes + failures by
reason + rows of shards not finished yet``. It also names the top failing domains, gives raw
error examples per status, and says what a low success rate usually means.
"""

from __future__ import annotations

import logging
import textwrap
from typing import Any

from base.shards import ShardError, is_complete, read_table, shard_name
from curate.download.plan import Plan
from curate.download.status import RETRYABLE, STATUSES, SUCCESS

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"  # download's summary record (bench/download.py and the Makefile read it by this name)
TOP_DOMAINS = 10
EXAMPLES_PER_STATUS = 3
# scheme://[user@]host — the host of a URL, vectorised
_HOST_RE = r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?(?P<host>\[[^\]]*\]|[^:/?#]*)"

# (status, share of all rows from which it is worth a line, what to do)
_DIAGNOSES: tuple[tuple[str, float, str], ...] = (
    ("dns", 0.02, "DNS failures: at this scale a local caching resolver is needed (img2dataset's README: "
                  "knot-resolver or bind9), or fewer --threads"),
    ("timeout", 0.02, "timeouts: usually rate limiting or a saturated link; lower --threads/--processes or raise "
                      "--timeout, then --retry-failed"),
    ("http_429", 0.005, "rate limited (HTTP 429): lower --threads, spread the pool over time, then --retry-failed"),
    ("connection", 0.02, "connection failures (refused, reset, truncated): often an overloaded link or blocking; "
                         "--retry-failed later"),
    ("http_5xx", 0.02, "server errors (5xx): often transient; --retry-failed later"),
    ("refused_url", 0.01, "the URL guard refused these (not http(s), or a private/loopback address); a pool on your "
                          "own network needs --allow-private-addresses"),
    ("http_404", 0.05, "link rot (404): expected for an older pool, not retryable"),
    ("decode_error", 0.02, "answers that are not images (HTML error or login pages, corrupt files)"),
)


def build_manifest(out: str, plan: Plan, *, min_success_rate: float, verify_hash: bool, extra: dict[str, Any]) -> dict[str, Any]:
    """Count every finished shard of ``out`` and reconcile with ``plan``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    status_counts: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    domain_tables = []
    incomplete, problems = [], []
    sha_mismatches = 0
    for shard_id in range(plan.num_shards):
        if not is_complete(out, shard_id):
            incomplete.append(shard_id)
            continue
        tar = f"{out}/{shard_name(shard_id)}.tar"
        table = read_table(tar, columns=["uid", "status", "error_message", "url", "sha256_match"])
        if table.num_rows != plan.shard_rows(shard_id):
            problems.append(f"{tar}: {table.num_rows} rows, the plan has {plan.shard_rows(shard_id)}")
        statuses = table.column("status")
        for item in pc.value_counts(statuses).to_pylist():
            status_counts[item["values"]] = status_counts.get(item["values"], 0) + item["counts"]
        failed = pc.not_equal(statuses, SUCCESS)
        if pc.any(failed).as_py():
            failures = table.filter(failed).select(["status", "error_message"]).to_pylist()
            for row in failures:
                seen = examples.setdefault(row["status"], [])
                message = (row["error_message"] or "")[:300]
                if len(seen) < EXAMPLES_PER_STATUS and message not in seen:
                    seen.append(message)
        mismatch = pc.and_(pc.equal(statuses, SUCCESS), pc.equal(table.column("sha256_match"), False))
        sha_mismatches += int(pc.sum(pc.cast(pc.fill_null(mismatch, False), pa.int64())).as_py() or 0)
        hosts = pc.utf8_lower(pc.struct_field(pc.extract_regex(pc.fill_null(table.column("url"), ""), _HOST_RE), "host"))
        hosts = pc.fill_null(pc.if_else(pc.equal(hosts, ""), None, hosts), "(no host)")
        per_domain = pa.table({"domain": hosts, "failed": pc.cast(failed, pa.int64())}).group_by("domain").aggregate(
            [("failed", "sum"), ("failed", "count")]
        )
        domain_tables.append(per_domain)

    num_success = status_counts.get(SUCCESS, 0)
    num_rows = sum(status_counts.values())
    num_failed = num_rows - num_success
    not_attempted = sum(plan.shard_rows(s) for s in incomplete)
    reconciles = plan.num_rows == num_success + num_failed + not_attempted and not problems
    success_rate = num_success / num_rows if num_rows else 0.0
    failures = {s: n for s, n in _ordered(status_counts).items() if s != SUCCESS}
    manifest: dict[str, Any] = {
        "pool": {"path": plan.pool, "num_rows": plan.num_rows, "fingerprint": plan.fingerprint},
        "out": out,
        "complete": not incomplete and not problems,
        "num_shards": plan.num_shards,
        "shards_complete": plan.num_shards - len(incomplete),
        "shards_incomplete": incomplete,
        "num_samples": num_rows,
        "num_success": num_success,
        "num_failed": num_failed,
        "not_attempted": not_attempted,
        "success_rate": round(success_rate, 6),
        "status_counts": _ordered(status_counts),
        "failures_by_reason": failures,
        "retryable_failures": sum(n for s, n in failures.items() if s in RETRYABLE),
        "reconciles": reconciles,
        "reconciliation": (
            f"pool rows {plan.num_rows} = {num_success} success + {num_failed} failed"
            + (f" + {not_attempted} not attempted" if not_attempted else "")
            + (" (OK)" if reconciles else " (MISMATCH)")
        ),
        "problems": problems,
        "top_failing_domains": _top_domains(domain_tables),
        "error_examples": examples,
        "sha256": {"verified": verify_hash, "success_with_other_sha256": sha_mismatches},
        "min_success_rate": min_success_rate,
        "low_success": bool(num_rows) and success_rate < min_success_rate,
    }
    manifest.update(extra)
    manifest["diagnosis"] = diagnose(manifest)
    return manifest


def _ordered(counts: dict[str, int]) -> dict[str, int]:
    order = {s: i for i, s in enumerate(STATUSES)}
    return dict(sorted(counts.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def _top_domains(tables: list) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.compute as pc

    if not tables:
        return []
    merged = pa.concat_tables(tables).group_by("domain").aggregate([("failed_sum", "sum"), ("failed_count", "sum")])
    merged = merged.filter(pc.greater(merged.column("failed_sum_sum"), 0))
    merged = merged.sort_by([("failed_sum_sum", "descending"), ("domain", "ascending")]).slice(0, TOP_DOMAINS)
    return [
        {"domain": d, "failures": int(f), "samples": int(n), "failure_rate": round(f / n, 4)}
        for d, f, n in zip(
            merged.column("domain").to_pylist(), merged.column("failed_sum_sum").to_pylist(),
            merged.column("failed_count_sum").to_pylist(), strict=True,
        )
    ]


def diagnose(manifest: dict[str, Any]) -> list[str]:
    """What the failure mix suggests, most telling first."""
    rows = manifest["num_samples"] or 1
    lines = []
    for status, share, advice in _DIAGNOSES:
        count = manifest["status_counts"].get(status, 0)
        if count and count / rows >= share:
            lines.append(f"{count} {status} ({count / rows:.1%}): {advice}")
    domains = manifest["top_failing_domains"]
    overall = manifest["num_failed"] / rows
    if (domains and manifest["num_failed"] >= 20 and domains[0]["failures"] >= 0.2 * manifest["num_failed"]
            and domains[0]["failure_rate"] >= 2 * overall):  # one host failing far more than the rest
        top = domains[0]
        lines.append(
            f"{top['domain']} accounts for {top['failures'] / manifest['num_failed']:.0%} of all failures "
            f"({top['failure_rate']:.0%} of its {top['samples']} samples fail): is it blocking or rate limiting us?"
        )
    retryable, rounds = manifest["retryable_failures"], manifest.get("retry_rounds") or []
    if retryable and rounds:
        lines.append(f"{retryable} retryable failures still fail after {len(rounds)} --retry-failed round(s) of this run; "
                     "the servers may be down or blocking: try --retry-failed again later")
    elif retryable:
        lines.append(f"{retryable} failures are retryable: run the same command with --retry-failed")
    return lines


def low_success_banner(manifest: dict[str, Any]) -> str:
    rate, floor = manifest["success_rate"], manifest["min_success_rate"]
    lines = [
        f"LOW SUCCESS RATE: {rate:.1%} of {manifest['num_samples']} samples downloaded (threshold {floor:.0%}).",
        "Low success is usually DNS trouble or rate limiting, not the pool:",
        *[f"  - {line}" for line in manifest["diagnosis"]],
    ]
    width = max(len(line) for line in lines) + 4
    bar = "!" * width
    return "\n".join([bar, *[f"! {line.ljust(width - 4)} !" for line in lines], bar])


def summary_text(manifest: dict[str, Any]) -> str:
    """One screen: totals, failures by reason, top failing domains, what to do next."""
    m = manifest
    run = m.get("this_run", {})
    lines = [
        f"qcap download → {m['out']}",
        f"  pool        {m['pool']['num_rows']} rows in {m['num_shards']} shards "
        f"({m['shards_complete']} complete{', ' + str(len(m['shards_incomplete'])) + ' NOT finished' if m['shards_incomplete'] else ''})",
        f"  success     {m['num_success']} ({m['success_rate']:.1%})",
        f"  failed      {m['num_failed']}" + (f", {m['retryable_failures']} retryable" if m["retryable_failures"] else ""),
    ]
    if run:
        lines.append(
            f"  this run    {run.get('fetched', 0)} fetched in {run.get('seconds', 0):.1f} s "
            f"({run.get('samples_per_s', 0):.1f} samples/s) on {run.get('distributor', '?')}"
        )
    if m["failures_by_reason"]:
        lines.append("  failures by reason:")
        width = max(len(s) for s in m["failures_by_reason"])
        for status, count in m["failures_by_reason"].items():
            share = count / m["num_samples"] if m["num_samples"] else 0.0
            meaning = textwrap.shorten(STATUSES.get(status, ""), 64, placeholder=" …")
            lines.append(f"    {status.ljust(width)} {count:>9}  {share:6.1%}  {meaning}")
    if m["top_failing_domains"]:
        lines.append("  top failing domains:")
        for d in m["top_failing_domains"][:5]:
            lines.append(f"    {d['domain'][:40]:40s} {d['failures']:>7} of {d['samples']:<7} ({d['failure_rate']:.0%})")
    if m["sha256"]["success_with_other_sha256"]:
        lines.append(f"  sha256      {m['sha256']['success_with_other_sha256']} successes differ from the pool's sha256 "
                     "(kept; --verify-hash fails them)")
    lines.append(f"  accounting  {m['reconciliation']}")
    for item in m.get("problems", [])[:5]:
        lines.append(f"  PROBLEM     {item}")
    if m["shards_incomplete"]:
        lines.append(f"  {len(m['shards_incomplete'])} shard(s) failed; run the same command again to finish them")
    if m["diagnosis"] and not m["low_success"]:
        lines.append("  notes:")
        lines += [f"    - {line}" for line in m["diagnosis"]]
    lines.append(f"  manifest    {m['out']}/{MANIFEST_FILE}")
    text = "\n".join(lines)
    if m["low_success"]:
        text += "\n" + low_success_banner(m)
    return text


def read_manifest(out: str) -> dict[str, Any]:
    import json

    import fsspec

    path = f"{out.rstrip('/')}/{MANIFEST_FILE}"
    try:
        with fsspec.open(path, "rb") as handle:
            return json.load(handle)
    except FileNotFoundError as err:
        raise ShardError(f"{path}: missing; run qcap download first") from err
