"""The optional JSON-lines access log of a forwarding tier.

Off by default. When on, each answered request costs one ``json.dumps`` and an
append to an in-memory buffer; the buffer is written out once per ``FLUSH_INTERVAL``
(and on close), so the hot path never waits on the disk.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import IO

from lbstack.log import get_logger

FLUSH_INTERVAL = 0.5
log = get_logger("accesslog")


class AccessLog:
    """Buffers one JSON object per request and writes them out in batches."""

    def __init__(self, path: str, instance: str) -> None:
        self._instance = instance
        target = path.replace("{name}", instance)
        self._file: IO[str] = (
            sys.stderr if target == "-" else open(target, "a", encoding="utf-8")  # noqa: SIM115
        )
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None

    def write(
        self,
        request_id: str,
        method: str,
        path: str,
        status: int,
        upstream: str,
        attempts: int,
        duration: float,
    ) -> None:
        self._lines.append(
            json.dumps(
                {
                    "time": round(time.time(), 6),
                    "instance": self._instance,
                    "request_id": request_id,
                    "method": method,
                    "path": path,
                    "status": status,
                    "upstream": upstream,
                    "attempts": attempts,
                    "duration": round(duration, 6),
                },
                separators=(",", ":"),
            )
        )
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        self._timer = None
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        try:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
        except OSError as exc:
            log.error("cannot write the access log: %s (%d lines lost)", exc, len(lines))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        if self._file is not sys.stderr:
            self._file.close()
