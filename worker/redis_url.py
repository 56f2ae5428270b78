"""Redis URLs as logs and output may show them: the password replaced by `***`."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_MASK = "***"


def redact_url(url: str) -> str:
    """`redis://user:secret@host:6379/0?password=x` → `redis://user:***@host:6379/0?password=***`.

    Anything that does not parse as a URL is masked whole rather than shown.
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            if ":" in userinfo:  # user:password or :password; a bare user name is shown
                userinfo = userinfo.split(":", 1)[0] + ":" + _MASK
            netloc = f"{userinfo}@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode(
                [(k, _MASK if k.lower() == "password" else v) for k, v in pairs], safe="*"
            )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return _MASK
