"""`CLIENTSYNC_LOG_FORMAT=json`: one JSON object per log record, for log pipelines.

Each line holds `time` (RFC 3339, UTC), `level`, `logger`, `message` (already masked by
`worker.logsafe`), `exc` for a traceback, and the structured fields a record carries in
`extra={"fields": {...}}` (worker.jobs binds event_id, provider, attempt, client and the
masked email to every outcome line). Those fields are set on the record after `logsafe`'s
record factory ran, so they are masked here, with the same masker.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from worker.logsafe import Masker, env_secrets

#: the `extra` key under which a log call passes its structured fields
FIELDS = "fields"
_RESERVED = frozenset({"time", "level", "logger", "message", "exc"})


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON (see the module docstring)."""

    def __init__(self, masker: Masker | None = None) -> None:
        super().__init__()
        self.masker = masker or Masker(env_secrets())

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.masker(value)
        if isinstance(value, dict):
            return {str(k): self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(v) for v in value]
        if value is None or isinstance(value, bool | int | float):
            return value
        return self.masker(str(value))

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": self.masker(record.getMessage()),
        }
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            for key, value in self._clean(fields).items():
                out[key if key not in _RESERVED else f"field_{key}"] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = self.masker(record.exc_text)
        return json.dumps(out, default=str, ensure_ascii=False)


def use_json(logger: logging.Logger | None = None) -> None:
    """Give every handler of `logger` (the root logger by default) the JSON formatter."""
    target = logger or logging.getLogger()
    formatter = JsonFormatter()
    for handler in target.handlers:
        handler.setFormatter(formatter)
