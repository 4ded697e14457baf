"""No log line carries a full email address or a secret, whoever writes it (ours, Celery, kombu).

`install` wraps the process's log record factory: every record's message is rendered once,
with emails masked (`worker.models.mask_emails`) and secrets replaced by `***`, before any
handler or formatter sees it; an exception's traceback is rendered and masked the same way.
A record factory (not a handler filter) covers every logger and every handler, including the
ones Celery and kombu set up after us, e.g. Celery's "Received invalid task message … The full
contents of the message body was: …" line.

Secrets: every Standard Webhooks secret (`whsec_…`), bearer tokens, and the values of every
`CLIENTSYNC_*` environment variable whose name says it holds a secret (SECRET, TOKEN, KEY,
PASSWORD), which covers the monitor token and every provider credential.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from worker.models import mask_emails

_SECRET_NAME = re.compile(r"SECRET|TOKEN|KEY|PASSWORD", re.IGNORECASE)
_SECRET_SHAPES = re.compile(r"whsec_[A-Za-z0-9+/=_-]+|(?<=Bearer )[A-Za-z0-9._~+/=-]{8,}")
#: values shorter than this are not masked (they would mask ordinary words)
MIN_SECRET = 8
_FORMATTER = logging.Formatter()


def env_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of `CLIENTSYNC_*` variables whose names say they hold secrets."""
    environ = os.environ if environ is None else environ
    out: list[str] = []
    for name, value in environ.items():
        if name.startswith("CLIENTSYNC_") and _SECRET_NAME.search(name):
            out += [v.strip() for v in value.split(",") if len(v.strip()) >= MIN_SECRET]
    return out


class Masker:
    """Masks emails and secrets in text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        values = sorted({s for s in secrets if len(s) >= MIN_SECRET}, key=len, reverse=True)
        self._values = re.compile("|".join(re.escape(v) for v in values)) if values else None

    def __call__(self, text: str) -> str:
        if self._values is not None:
            text = self._values.sub("***", text)
        return mask_emails(_SECRET_SHAPES.sub("***", text))


def mask_record(record: logging.LogRecord, masker: Masker) -> None:
    """Render the record's message (and traceback) once, masked; formatters then use the result."""
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: logging reports it later; leave the record as it is
        return
    record.msg, record.args = masker(message), None
    if record.exc_info and not record.exc_text:
        record.exc_text = masker(_FORMATTER.formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = masker(record.stack_info)


def install(secrets: Iterable[str] | None = None) -> Masker:
    """Mask every log record of this process from now on (idempotent: installs once)."""
    current = logging.getLogRecordFactory()
    masker = Masker(env_secrets() if secrets is None else secrets)
    base = getattr(current, "clientsync_base", current)

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        mask_record(record, masker)
        return record

    factory.clientsync_base = base  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
    return masker
