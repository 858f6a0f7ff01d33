"""Server addresses as they may be shown: in error messages, logs and ``repr``."""

from __future__ import annotations

import re

__all__ = ["redact_url"]

# The user info of one address: after an optional scheme, everything up to the last "@"
# before the first "/", "?" or "#" (a password may itself hold an "@").
_USERINFO = re.compile(r"^(?P<scheme>\s*[A-Za-z][A-Za-z0-9+.-]*://)?(?P<info>[^/?#]*)@")
_SECRET_QUERY = re.compile(r"(?P<key>[?&;](?:ssl)?password=)[^&;#]*", re.IGNORECASE)


def _redact_userinfo(match: re.Match[str]) -> str:
    user, colon, _secret = match["info"].partition(":")
    # "user:password@" keeps the user; a lone "token@" is all secret.
    info = f"{user}:***" if colon else "***"
    return f"{match['scheme'] or ''}{info}@"


def redact_url(url: str) -> str:
    """``url`` with its secrets replaced by ``***``.

    Masks the password of ``scheme://user:password@host`` (and of the scheme-less
    ``user:password@host``), a lone token in ``scheme://token@host``, and the values of
    ``password=`` and ``sslpassword=`` query parameters. A comma-separated list of addresses
    (NATS) is redacted address by address. Everything else is left as written.
    """
    return ",".join(
        _SECRET_QUERY.sub(r"\g<key>***", _USERINFO.sub(_redact_userinfo, one, count=1))
        for one in url.split(",")
    )
