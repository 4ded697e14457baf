"""Every Redis key clientsync writes, and every TTL, in one place.

Keys share the `cs:` prefix so an operator can find (or flush) them. The Celery queue
itself is a plain list named after the queue (kombu's convention), not prefixed here.
"""

from __future__ import annotations

import hashlib

PREFIX = "cs:"

#: inbound dedupe: the sender's event id, claimed before enqueueing
def event(event_id: str) -> str:
    return f"{PREFIX}evt:{event_id}"


def idempotency_key(event_id: str, provider: str, operation: str) -> str:
    """Derived, never random: the same event, provider and operation give the same key."""
    digest = hashlib.sha256(f"{event_id}\x1f{provider}\x1f{operation}".encode()).hexdigest()[:32]
    return f"cs_{provider}_{digest}"


def idempotency(key: str) -> str:
    """Hash: status (running|failed|done), fp, owner, lease, outcome, attempts."""
    return f"{PREFIX}idem:{key}"


def client_state(provider: str, client_id: str) -> str:
    """Hash per (provider, client), kept without TTL: link (the provider's id), mark_v / mark_t
    (newest applied version and time, kept apart), deleted (tombstone), intent (a create about
    to be sent: "<event>@<unix s>"), del_intent (a delete about to be sent), unsettled ("<job
    idempotency key>|<settle at, ms>": a write ended unclearly), resolution (an operator's
    answer to a needs_attention job: JSON)."""
    return f"{PREFIX}client:{provider}:{client_id}"


def record_owner(provider: str, provider_id: str) -> str:
    """The reverse link: (provider, provider's record id) -> the source client id that owns it.

    Written with the link (and when a record is claimed for adoption), removed with it: a
    provider record belongs to at most one source client. Kept without TTL, like the link."""
    return f"{PREFIX}owner:{provider}:{provider_id}"


def provider_epoch(provider: str) -> str:
    """Unix seconds clientsync first wrote to this provider (set once, never expires): records
    created before it may be namesakes of a client made by hand; records created after it are
    clientsync's own (linked, or settled by their create's intent)."""
    return f"{PREFIX}epoch:{provider}"


def client_lock(provider: str, client_id: str) -> str:
    return f"{PREFIX}lock:{provider}:{client_id}"


def job_id(provider: str, event_id: str) -> str:
    """The ledger id of one (event, provider) job."""
    return f"{provider}:{event_id}"


def job(job_id: str) -> str:
    """Hash: one ledger record."""
    return f"{PREFIX}job:{job_id}"


def job_attempts(job_id: str) -> str:
    """List of JSON attempt records, oldest first."""
    return f"{PREFIX}job:{job_id}:attempts"


#: sorted set of every job id, scored by last update (ms): listing and retention
JOBS_BY_TIME = f"{PREFIX}jobs"


def jobs_in_state(state: str) -> str:
    """Sorted set of job ids currently in `state`, scored by last update (ms)."""
    return f"{PREFIX}jobs:state:{state}"


def rate_bucket(provider: str) -> str:
    return f"{PREFIX}rate:{provider}"


def circuit(provider: str) -> str:
    return f"{PREFIX}circuit:{provider}"


#: list of JSON audit entries (operator pause/resume/probe, automatic auth pauses), newest first,
#: trimmed to AUDIT_MAX
AUDIT = f"{PREFIX}audit"
AUDIT_MAX = 1000


#: sorted set of parked retries (JSON task payloads) scored by due time (ms)
DELAYED = f"{PREFIX}delayed"

#: hash of worker heartbeats: worker process -> "<at_ms> <every>" (see worker.heartbeat)
HEARTBEATS = f"{PREFIX}heartbeats"


# --- monitoring: ledger indexes and shared counters (worker.ledger, worker.monitor, worker.metrics) ---
def jobs_of_provider_in_state(provider: str, state: str) -> str:
    """Sorted set of one provider's job ids in `state`, scored by last update (ms)."""
    return f"{PREFIX}jobs:ps:{provider}:{state}"


def jobs_of_client(client_id: str) -> str:
    """Sorted set of the job ids of one client (every provider), scored by last update (ms)."""
    return f"{PREFIX}jobs:client:{client_id}"


#: sorted set of finished job ids (succeeded, skipped, dead, discarded) scored by last update (ms):
#: what retention trims
JOBS_FINISHED = f"{PREFIX}jobs:finished"


def stats(provider: str) -> str:
    """Hash of monotonic counters per provider (enqueued, applied, retried, dead, skipped, replayed,
    discarded), written by the ledger's transition script in every worker process."""
    return f"{PREFIX}stats:{provider}"


def latency(provider: str) -> str:
    """Hash: receipt-to-applied latency histogram (one field per bucket upper bound, `sum`, `count`)."""
    return f"{PREFIX}latency:{provider}"


#: set of every provider name the ledger has seen (so readers never SCAN for stats keys)
STATS_PROVIDERS = f"{PREFIX}stats:providers"

#: hash job id -> its one parked message in `DELAYED` (so a re-park replaces, never doubles)
DELAYED_JOBS = f"{PREFIX}delayed:jobs"

# --- message ownership (worker.inflight, tasks.transport) ---
#: kombu's Redis transport keeps delivered, unacked messages here (kombu's default key names):
#: a hash delivery tag -> `[message, exchange, routing key]` and a sorted set tag -> delivery time (s)
KOMBU_UNACKED = "unacked"

# --- intake (tasks.intake, worker.parking, worker.web): poison-proof queue and operator doors ---
#: hash reason -> count of dead letters (messages that never became a valid job): /metrics
DEAD_LETTERS = f"{PREFIX}stats:dead_letters"

#: hash "<provider>|<status>" -> provider responses seen by every worker (worker.responses): /metrics
PROVIDER_RESPONSES = f"{PREFIX}stats:responses"

#: the HMAC key that marks `clientsync.apply_change` messages as made by clientsync
#: (created once, at random, by the first process that needs it; see worker.parking)
TASK_KEY = f"{PREFIX}task-key"


def dashboard_session(session_id: str) -> str:
    """One signed-in dashboard session (value: expiry, unix s); deleted on logout."""
    return f"{PREFIX}session:{session_id}"


def auth_failures(client: str) -> str:
    """Counter of wrong monitor tokens from one client address (expires `AUTH_FAILURE_WINDOW_SECONDS`)."""
    return f"{PREFIX}authfail:{client}"


AUTH_FAILURE_WINDOW_SECONDS = 15 * 60

#: hash state -> score (ms) up to which finished jobs' stored changes were already dropped
LEDGER_SCRUBBED = f"{PREFIX}jobs:scrubbed"


# --- provider OAuth tokens (worker.providers.qonto_auth) ---
def oauth_token(provider: str) -> str:
    """Hash: the provider's current OAuth token set (access_token, refresh_token, expires_at, seed),
    shared by every worker. Its TTL is the refresh token's lifetime, renewed on every refresh."""
    return f"{PREFIX}oauth:{provider}"


def oauth_refresh_lock(provider: str) -> str:
    """The single-flight refresh lock: one worker refreshes, the others wait for its result."""
    return f"{PREFIX}oauth:{provider}:lock"


#: Qonto's refresh tokens live 90 days (docs.qonto.com, OAuth "Token endpoint")
OAUTH_TOKEN_TTL_SECONDS = 90 * 24 * 3600
#: a refresh that has not finished by then (a crashed holder) lets another worker try
OAUTH_REFRESH_LOCK_SECONDS = 30

KOMBU_UNACKED_INDEX = "unacked_index"

#: sorted set of live processes (workers' consumers and runtimes): owner id -> last heartbeat
#: (ms, Redis's clock). An owner whose beat is older than `OWNER_TTL_SECONDS` is dead: a reaper
#: gives its messages and running jobs back.
OWNERS = f"{PREFIX}owners"
OWNER_TTL_SECONDS = 10
#: a process beats every `OWNER_TTL_SECONDS / OWNER_BEATS_PER_TTL` seconds
OWNER_BEATS_PER_TTL = 5

#: hash delivery tag -> the owner holding that delivery (who may ack it)
HOLDERS = f"{PREFIX}holders"


def owner_queues(owner: str) -> str:
    """Set of the queues an owner took messages from (where the reaper looks)."""
    return f"{PREFIX}ownerq:{owner}"


def inbox(queue: str, owner: str) -> str:
    """List: a message the owner moved off `queue` (BLMOVE) and has not recorded as held yet."""
    return f"{PREFIX}inbox:{queue}:{owner}"


def held(queue: str, owner: str) -> str:
    """Set of delivery tags the owner holds from `queue` (recorded in kombu's unacked hash)."""
    return f"{PREFIX}held:{queue}:{owner}"


def running_jobs(owner: str) -> str:
    """Set of ledger job ids the owner is running."""
    return f"{PREFIX}running:{owner}"


#: the reaper's last sweep (ms) and the time (ms) before which it reaps nobody: after a gap in
#: sweeping (Redis down or restarted from its AOF), live owners get one TTL to beat again
REAPER_LAST = f"{PREFIX}reaper:last"
REAPER_GRACE = f"{PREFIX}reaper:grace"
