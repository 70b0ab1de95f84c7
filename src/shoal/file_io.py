"""Types of the sandbox file API (Modal's `modal.file_io`): watch events and their kinds.

The file API itself (`Sandbox.open`, `Sandbox.filesystem`) is tracked in the issue on the sandbox
file API; these names exist so that code annotating with them imports.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FileWatchEventType(enum.Enum):
    Unknown = "Unknown"
    Access = "Access"
    Create = "Create"
    Modify = "Modify"
    Remove = "Remove"


@dataclass
class FileWatchEvent:
    paths: list[str]
    type: FileWatchEventType
