"""Settings from the environment (prefix `CLIENTSYNC_`), built once at each composition root."""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DAY = 24 * 3600
#: the shortest monitor token accepted: a guessable one would open the ledger's personal data
MIN_TOKEN = 32
ENV_PREFIX = "CLIENTSYNC_"
#: `CLIENTSYNC_<NAME>_FILE=/path` sets `CLIENTSYNC_<NAME>` from that file (Docker/Kubernetes secrets)
FILE_SUFFIX = "_FILE"


class SettingsError(ValueError):
    """Configuration an operator must fix; the message names each variable and its rule."""


#: the loop pool's class, for Celery's out-of-tree pool hook (CELERY_CUSTOM_WORKER_POOL)
LOOP_POOL = "tasks.pool:LoopPool"


def drop_empty(data: Any) -> Any:
    """Empty means unset: compose and .env files pass unset variables as "" (a blank value is no value)."""
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if not (isinstance(v, str) and not v.strip())}
    return data


def read_secret_files(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Resolve every `CLIENTSYNC_*_FILE` into its variable (in place); returns the names set.

    Trailing newlines are dropped (`echo secret > file`). Setting both a variable and its
    `_FILE` is refused, as is a file that cannot be read.
    """
    env = os.environ if environ is None else environ
    done = []
    for key in sorted(env):
        if not (key.startswith(ENV_PREFIX) and key.endswith(FILE_SUFFIX)) or not env[key].strip():
            continue
        target = key[: -len(FILE_SUFFIX)]
        if env.get(target, "").strip():
            raise SettingsError(f"{target} and {key} are both set: set only one of them")
        try:
            with open(env[key].strip(), encoding="utf-8") as handle:
                value = handle.read().rstrip("\r\n")
        except OSError as exc:
            raise SettingsError(f"{key}: cannot read {env[key].strip()!r} ({exc.strerror})") from exc
        if not value.strip():
            raise SettingsError(f"{key}: the file {env[key].strip()!r} is empty")
        env[target] = value
        done.append(target)
    return done


def env_name(model: type[BaseModel], field: str) -> str:
    """The environment variable that sets `field` of a settings class."""
    prefix = str(model.model_config.get("env_prefix", ""))
    return f"{prefix}{field}".upper()


def describe_errors(model: type[BaseModel], exc: ValidationError) -> list[str]:
    """One line per invalid setting: the variable, the rule, and (unless secret) the value given."""
    lines = []
    for error in exc.errors():
        loc = error["loc"]
        field = str(loc[0]) if loc else ""
        name = env_name(model, field) if field else model.__name__
        info = model.model_fields.get(field)
        secret = info is not None and "SecretStr" in repr(info.annotation)
        got = "" if secret or "input" not in error or isinstance(error["input"], dict) \
            else f" (got {error['input']!r})"
        lines.append(f"{name}: {error['msg']}{got}")
    return lines


class Settings(BaseSettings):
    """Process-wide settings. Provider settings live with each adapter (`worker.providers`)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True, env_ignore_empty=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_means_unset(cls, data: Any) -> Any:
        return drop_empty(data)

    redis_url: str | None = Field(
        None, description="Redis for broker and state; unset = start an embedded redis-server."
    )
    queue: str = Field("celery", description="Celery queue that carries clientsync.sync_client.")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    webhook_secret: SecretStr | None = Field(
        None, description="Comma-separated Standard Webhooks secrets (whsec_...); several = rotation."
    )
    webhook_tolerance_seconds: int = Field(300, ge=1)
    monitor_token: SecretStr | None = Field(
        None, description="Bearer token for /monitor and /dashboard; at least 32 characters.")
    max_body_bytes: int = Field(256 * 1024, ge=1024)

    event_ttl_seconds: int = Field(7 * DAY, ge=60, description="How long an event id is remembered.")
    idempotency_ttl_seconds: int = Field(7 * DAY, ge=60)
    lease_seconds: float = Field(60.0, gt=0, description="Lease on a job claim and a client lock.")
    lock_wait_seconds: float = Field(20.0, ge=0, description="How long a job waits for a busy client.")

    visibility_timeout: int = Field(3600, ge=1, description="Redis broker redelivery timeout (s).")
    unacked_restore_interval: int = Field(
        10, ge=1, description="How often (s) workers look for unacked messages past the visibility timeout."
    )
    durability: Literal["auto", "none", "aof"] = Field(
        "auto", description="What a webhook 2xx promises: aof = fsynced to Redis's AOF (WAITAOF, Redis 7.2+); "
        "none = in Redis's memory; auto = aof when Redis supports it.",
    )
    durability_timeout_seconds: float = Field(
        2.0, gt=0, description="Longest wait for the AOF fsync before answering 503 (durability aof/auto).",
    )
    reaper_interval_seconds: float = Field(
        1.0, gt=0, le=10,
        description="How often each worker looks for a dead worker's messages and running jobs (worker.inflight).",
    )
    heartbeat_seconds: float = Field(
        10.0, ge=0.5, le=300,
        description="How often each worker process writes its heartbeat; /readyz counts a worker as live while "
        "its last one is younger than two of these.",
    )
    task_events: bool = Field(
        False, description="Celery task events from the start. Off, Flower still turns them on while it runs "
        "(its enable_events); on, they cost about 30% of a worker's CPU (docs/benchmarks.md).",
    )
    worker_concurrency: int | None = Field(
        None, ge=1,
        description="Tasks at once per worker process; empty = the pool's default: 256 changes in flight with "
        "the loop pool, 64 threads, one process per core with prefork, 1 with solo.",
    )
    worker_pool: Literal["loop", "threads", "prefork", "solo"] = Field(
        "loop", description="Celery pool: loop runs each change on the process's event loop (no thread held while "
        "providers answer); threads holds one thread per change.",
    )
    max_attempts: int = Field(8, ge=1)
    retry_base_seconds: float = Field(1.0, gt=0)
    retry_cap_seconds: float = Field(300.0, gt=0)
    retry_after_max_seconds: float = Field(
        DAY, gt=0, description="Longest Retry-After/reset wait honoured; a larger one is cut to this."
    )
    park_poll_seconds: float = Field(
        0.5, gt=0, le=10, description="How often each worker process moves due parked retries to the queue."
    )
    rate_wait_seconds: float = Field(
        10.0, ge=0, description="Longest in-process wait for a rate-limit token; longer waits park the job (which "
        "then repeats its lookups: at Qonto's limit with 256 changes in flight, 2 s parked half the calls' worth)."
    )
    circuit_failure_threshold: int = Field(
        5, ge=1, description="Consecutive transient provider failures that open the circuit."
    )
    circuit_cooldown_seconds: float = Field(30.0, gt=0, description="First open period before a probe.")
    circuit_max_cooldown_seconds: float = Field(
        600.0, gt=0, description="Each failed probe doubles the open period, up to this."
    )
    circuit_probe_lease_seconds: float = Field(
        120.0, gt=0, description="A probe whose worker vanished is handed to another job after this."
    )
    circuit_recheck_seconds: float = Field(
        1.0, gt=0, description="How soon jobs waiting on a half-open circuit look again."
    )

    log_level: str = "INFO"
    log_format: Literal["text", "json"] = Field(
        "text", description="text: readable lines; json: one JSON object per line, with event_id, provider, "
                            "attempt and client as keys on every job outcome."
    )

    # --- monitoring: ledger retention (finished jobs only; see worker.ledger) ---
    ledger_max_jobs: int = Field(100_000, ge=1, description="Finished jobs kept in the ledger (oldest dropped).")
    ledger_max_age_seconds: float = Field(14 * DAY, gt=0, description="Finished jobs older than this are dropped.")
    ledger_trim_every: int = Field(500, ge=0, description="Each worker trims after this many new jobs; 0 = timer only.")
    ledger_trim_interval_seconds: float = Field(10.0, gt=0, description="Each worker also trims on this timer.")
    ledger_change_ttl_seconds: float = Field(
        7 * DAY, ge=0, description="The full change (emails, addresses) kept in a succeeded or skipped job is "
                                   "dropped after this long.")

    @field_validator("webhook_secret")
    @classmethod
    def _secrets_have_the_prefix(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        for part in value.get_secret_value().split(","):
            part = part.strip()
            if part and not part.startswith("whsec_"):
                raise ValueError("each secret must start with 'whsec_' (Standard Webhooks format)")
        return value

    @field_validator("monitor_token")
    @classmethod
    def _token_is_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and 0 < len(value.get_secret_value()) < MIN_TOKEN:
            raise ValueError(f"must be at least {MIN_TOKEN} characters (make one with: python -c "
                             "'import secrets; print(secrets.token_urlsafe(32))')")
        return value

    def webhook_secrets(self) -> list[str]:
        if self.webhook_secret is None:
            return []
        return [s.strip() for s in self.webhook_secret.get_secret_value().split(",") if s.strip()]

    def concurrency(self) -> int:
        """Tasks at once per worker process: the setting, else the pool's default."""
        if self.worker_concurrency is not None:
            return self.worker_concurrency
        return default_concurrency(self.worker_pool)


def default_concurrency(pool: str) -> int:
    """The loop pool holds a coroutine per change in flight, not a thread (tasks.pool); threads
    wait on the network, so many are worth it (docs/benchmarks.md); prefork runs a process per core."""
    return {"loop": 256, "threads": 64, "prefork": os.cpu_count() or 1}.get(pool, 1)
