"""The download status vocabulary, and the map from img2dataset's raw error messages onto it.

img2dataset records a failure as ``status=failed_to_download|failed_to_resize`` plus the text
of whatever exception was raised (``"HTTP Error 404: Not Found"``, ``"<urlopen error timed
out>"``, ``"Image decoding error"``, …). qcap keeps that text in ``error_message`` and files
every sample under one clean ``status`` from :data:`STATUSES`, so counts reconcile by reason
and ``--retry-failed`` knows what is worth another try (:data:`RETRYABLE`).

The rules are a table, tried in order; the first pattern that matches the raw message wins.
qcap's own refusals (URL guard, size bounds, request deadline) carry a ``[qcap:<status>]`` tag
so they map without guessing.
"""

from __future__ import annotations

import re

SUCCESS = "success"

# status -> what it means (the order is the order of the summary table).
STATUSES: dict[str, str] = {
    SUCCESS: "downloaded, decoded and resized",
    "http_404": "HTTP 404 Not Found (link rot)",
    "http_4xx": "another HTTP 4xx client error (401, 403, 410, …) except 404 and 429",
    "http_429": "HTTP 429 Too Many Requests (rate limited)",
    "http_5xx": "HTTP 5xx server error",
    "timeout": "no answer within --timeout, or the request ran past its deadline",
    "connection": "connection refused, reset or closed early; truncated body; malformed HTTP",
    "dns": "host name did not resolve",
    "tls": "TLS handshake or certificate failure",
    "decode_error": "the bytes are not a decodable image (HTML page, corrupt file)",
    "too_large": "image over --max-pixels, or body over --max-image-bytes (refused, never decoded)",
    "refused_url": "refused by the URL guard: not http(s), or a loopback/private/reserved address",
    "bad_url": "malformed URL (control characters, bad port, non-ASCII host)",
    "disallowed": "the server's X-Robots-Tag forbids AI use (noai, noimageai, …)",
    "hash_mismatch": "downloaded bytes do not match the pool's sha256 (only with --verify-hash)",
    "resize_error": "img2dataset's resizer failed on a decodable image",
    "error": "anything else; the raw message is in error_message",
}

# Failures worth another try later: the server or the network may answer next time.
RETRYABLE: frozenset[str] = frozenset({"http_429", "http_5xx", "timeout", "connection", "dns"})

QCAP_TAG = re.compile(r"\[qcap:([a-z0-9_]+)\]")


def qcap_tag(status: str) -> str:
    """The tag qcap's own refusals start their message with (``[qcap:refused_url]``)."""
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}")
    return f"[qcap:{status}]"


# (status, pattern) in order; patterns are searched case-insensitively in the raw message.
_DOWNLOAD_RULES: tuple[tuple[str, str], ...] = (
    ("http_404", r"HTTP Error 404\b"),
    ("http_429", r"HTTP Error 429\b"),
    ("http_4xx", r"HTTP Error 4\d\d\b"),
    ("http_5xx", r"HTTP Error 5\d\d\b"),
    ("disallowed", r"disallowed by X-Robots-Tag"),
    ("hash_mismatch", r"^hash mismatch$"),
    ("refused_url", r"unknown url type"),
    ("timeout", r"timed out|\[Errno 110\]"),
    ("dns", r"Name or service not known|Temporary failure in name resolution|No address associated"
            r"|nodename nor servname|getaddrinfo failed|\[Errno -[235]\]"),
    ("tls", r"SSL|CERTIFICATE|certificate|wrong version number"),
    ("connection", r"Connection (refused|reset|aborted)|Remote end closed|IncompleteRead|Broken pipe"
                   r"|Network is unreachable|No route to host|RemoteDisconnected|BadStatusLine|LineTooLong"
                   r"|got more than \d+ headers|EOF occurred|\[Errno 10[1-4]\]|\[Errno 11[13]\]"),
    ("bad_url", r"control characters|nonnumeric port|codec can't encode|Invalid URL|no host given|label empty or too long"),
)
_RESIZE_RULES: tuple[tuple[str, str], ...] = (
    ("too_large", r"image area too large"),
    ("decode_error", r"decod|imdecode|not an image|cannot identify|truncated"),
)
_COMPILED_DOWNLOAD = tuple((s, re.compile(p, re.IGNORECASE)) for s, p in _DOWNLOAD_RULES)
_COMPILED_RESIZE = tuple((s, re.compile(p, re.IGNORECASE)) for s, p in _RESIZE_RULES)


def classify(stage: str | None, message: str | None) -> str:
    """The clean status of one img2dataset failure.

    ``stage`` is img2dataset's own status (``failed_to_download`` or ``failed_to_resize``);
    ``message`` its raw ``error_message``.
    """
    text = message or ""
    tagged = QCAP_TAG.search(text)
    if tagged and tagged.group(1) in STATUSES:
        return tagged.group(1)
    if stage == "failed_to_resize":
        for status, pattern in _COMPILED_RESIZE:
            if pattern.search(text):
                return status
        return "resize_error"
    for status, pattern in _COMPILED_DOWNLOAD:
        if pattern.search(text):
            return status
    return "error"


def is_retryable(status: str) -> bool:
    return status in RETRYABLE
