"""Where an exec'd process's output goes (Modal's `modal.stream_type.StreamType`)."""

import enum


class StreamType(enum.IntEnum):
    PIPE = -1  # captured; read it from process.stdout / process.stderr
    STDOUT = -2  # stderr only: merged into stdout
    DEVNULL = -3  # discarded

    def wire(self) -> str:
        return {StreamType.PIPE: "pipe", StreamType.STDOUT: "stdout",
                StreamType.DEVNULL: "devnull"}[self]
