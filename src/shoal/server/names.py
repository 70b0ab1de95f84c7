"""Names of things users name: apps, sandboxes, volumes, network file systems, secrets, dicts,
queues, and tag keys. One rule for all, checked by the server and published in the OpenAPI
document (`NAME_PATTERN`), so a generated client cannot send a name the server refuses.

1-64 characters from letters, digits, '.', '_' and '-', but not "." or "..". The pattern is an
ECMA/JSON-Schema regex without lookarounds; the server matches it with `re.fullmatch` (a Python
`$` would also match before a final newline, letting "name\\n" through).
"""

from __future__ import annotations

import re

from shoal.exception import InvalidError

NAME_PATTERN = (r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}"
                r"|\.\.[A-Za-z0-9._-]{1,62})$")
_NAME = re.compile(NAME_PATTERN.removeprefix("^").removesuffix("$"))


def valid_name(name: object) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


RULE = "use 1-64 characters from letters, digits, '.', '_' and '-' (not '.' or '..')"


def check_name(name: object, what: str = "volume") -> str:
    if not valid_name(name):
        raise InvalidError(f"invalid {what} name {name!r}: {RULE}")
    return name  # type: ignore[return-value]
