"""Names of things users name: apps, sandboxes, volumes, network file systems, secrets, dicts,
queues, and tag keys. One rule for all: the server checks it (server/names.py) and publishes it
in the OpenAPI document (`NAME_PATTERN`); the SDK checks a name it puts in a URL path with it.

1-64 characters from letters, digits, '.', '_' and '-', but not "." or "..". The pattern is an
ECMA/JSON-Schema regex without lookarounds; it is matched with `re.fullmatch` (a Python `$` would
also match before a final newline, letting "name\\n" through).
"""

from __future__ import annotations

import re

NAME_PATTERN = (r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}"
                r"|\.\.[A-Za-z0-9._-]{1,62})$")
_NAME = re.compile(NAME_PATTERN.removeprefix("^").removesuffix("$"))


def valid_name(name: object) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


RULE = "use 1-64 characters from letters, digits, '.', '_' and '-' (not '.' or '..')"
