"""Credentials kept out of what is logged and printed: which option names carry one, and
URIs shown with their secrets as ***."""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

# Option, header and query names that carry credentials, by what they are rather than by a
# list of known names: anything about secrets, passwords, tokens, credentials, private keys,
# auth (Authorization, Proxy-Authorization, X-Auth-Token), cookies, API/access/account keys
# (X-Api-Key, x-goog-api-key), SAS tokens, signatures and connection strings; and the
# bare names key, sig and code (an OAuth code in a query). A config is logged as MLflow
# params, config.json, every checkpoint and the model's MLmodel file, so a credential in it
# would be everywhere.
CREDENTIAL_NAME = re.compile(
    r"secret|passw|pwd|token|credential|private|auth|cookie|api[-_]?key|access[-_]?key|account[-_]?key"
    r"|sas|signature|connection[-_]?string|^key$|^sig$|^code$",
    re.IGNORECASE,
)
NON_SECRET_TOKENS = {"anon", "google_default", "cloud", "browser"}
"""gcsfs ``token`` modes that name where credentials come from, not credentials."""


def credential_names(options: Any, where: str = "") -> list[str]:
    """Dotted names of the entries of a JSON-like ``options`` tree that look like credentials:
    by their name, or a URL value with a password in it (a proxy's ``user:password@``)."""
    found = []
    if isinstance(options, str):
        return [where] if redact_uri(options) != options else []
    if isinstance(options, dict):
        for key, value in options.items():
            name = f"{where}.{key}" if where else str(key)
            if CREDENTIAL_NAME.search(str(key)) and not (isinstance(value, str) and value in NON_SECRET_TOKENS):
                found.append(name)
            else:
                found += credential_names(value, name)
    elif isinstance(options, list):
        for i, value in enumerate(options):
            found += credential_names(value, f"{where}[{i}]")
    return found


def redact_uri(uri: str) -> str:
    """``uri`` with the password of its user part (the whole user part for http(s), where a
    token often stands there) and credential query values as ***; unchanged without them.
    Parsed by hand: a password with an unencoded / defeats urllib's split."""
    base, qsep, query = uri.partition("?")
    scheme, sep, rest = base.partition("://")
    if sep and "@" in rest:
        userinfo, _, host = rest.rpartition("@")
        user, colon, password = userinfo.partition(":")
        is_path = "/" in user or (colon and re.fullmatch(r"\d+(/.*)?", password))  # s3://b/a@x, host:80/a@x
        if not is_path and colon:
            base = f"{scheme}://{user}:***@{host}"
        elif not is_path and scheme.lower() in ("http", "https"):
            base = f"{scheme}://***@{host}"
    query = "&".join(
        f"{key}=***" if CREDENTIAL_NAME.search(urllib.parse.unquote(key)) else f"{key}{eq}{value}"
        for key, eq, value in (item.partition("=") for item in query.split("&"))
    )
    return f"{base}{qsep}{query}"
