"""Names of things users name: apps, sandboxes, volumes, network file systems, secrets, dicts,
queues, and tag keys. One rule for all (shoal/_names.py, shared with the SDK), checked by the
server and published in the OpenAPI document (`NAME_PATTERN`), so a generated client cannot send
a name the server refuses.

1-64 characters from letters, digits, '.', '_' and '-', but not "." or "..". The pattern is an
ECMA/JSON-Schema regex without lookarounds; the server matches it with `re.fullmatch` (a Python
`$` would also match before a final newline, letting "name\\n" through).
"""

from __future__ import annotations

from shoal._names import NAME_PATTERN, RULE, valid_name
from shoal.exception import InvalidError

__all__ = ["NAME_PATTERN", "RULE", "check_name", "valid_name"]


def check_name(name: object, what: str = "volume") -> str:
    if not valid_name(name):
        raise InvalidError(f"invalid {what} name {name!r}: {RULE}")
    return name  # type: ignore[return-value]
