"""Server addresses as they may be shown: in error messages, logs and ``repr``."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["redact_text", "redact_url"]

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


def redact_text(text: str, url: str | None) -> str:
    """``text`` (an error message, say) with every secret of ``url`` masked.

    A driver's or Alembic's message may quote the URL as given, or only its password
    (percent-decoded or not): each form is replaced by ``***``. Secrets shorter than three
    characters are left, as masking them would garble unrelated words.
    """
    if not url:
        return text
    text = text.replace(url, redact_url(url))
    secrets: set[str] = set()
    for one in url.split(","):
        one = one.strip()
        try:
            parts = urlsplit(one if "://" in one else f"//{one}")
        except ValueError:
            continue
        info, at, _ = parts.netloc.rpartition("@")
        if at:
            user, colon, password = info.partition(":")
            secrets.add(password if colon else user)
        secrets.update(v for k, v in parse_qsl(parts.query) if k.lower() in ("password",
                                                                            "sslpassword"))
    for secret in sorted(secrets, key=len, reverse=True):
        for form in {secret, unquote(secret)}:
            if len(form) >= 3:
                text = text.replace(form, "***")
    return text
