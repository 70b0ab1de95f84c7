"""Print the server's OpenAPI document (checked in as docs/openapi.json)."""

from __future__ import annotations

import json
from pathlib import Path

from shoal.config import Paths


def document() -> dict:
    from shoal.server.app import create_app

    return json.loads(json.dumps(create_app(Paths(Path("/nonexistent"))).openapi()))


if __name__ == "__main__":
    print(json.dumps(document(), indent=1, sort_keys=True))
