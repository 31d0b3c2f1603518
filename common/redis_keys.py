"""Every Redis key name sdq writes or reads, in one place.

The Lua steps get the same names from here: ``LUA_NAMES`` below becomes Lua functions and
constants prepended to every step (``common/lua/__init__.py``), so a name is spelled once.
``docs/architecture.md`` has the layout with each key's type and purpose.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import date

from common.job import JobStatus

# --- jobs -------------------------------------------------------------------------------
#: Running jobs by the end of their lease (kept by the Lua steps).
RUNNING_KEY = "sdq:running"


def job_key(job_id: str) -> str:
    return f"sdq:job:{job_id}"


def events_key(job_id: str) -> str:
    """A job's events, the SSE history."""
    return f"sdq:job:{job_id}:events"


def webhooks_key(job_id: str) -> str:
    """The list of a job's webhook delivery ids."""
    return f"sdq:job:{job_id}:webhooks"


def events_channel(job_id: str) -> str:
    """The pub/sub channel on which every event of a job is published as it happens."""
    return f"sdq:events:{job_id}"


def taken_key(task_id: str) -> str:
    """Which job a task message took (``take.lua``): a redelivery runs the same job."""
    return f"sdq:taken:{task_id}"


def batch_key(batch_id: str) -> str:
    return f"sdq:batch:{batch_id}"


#: Stand-ins for the create step's KEYS when a request has no Idempotency-Key or batch.
NO_IDEMPOTENCY_KEY = "sdq:idem:none"
NO_BATCH_KEY = "sdq:batch:none"


def idempotency_key(key_id: str, token: str) -> str:
    return f"sdq:idem:{key_id}:{hashlib.sha256(token.encode()).hexdigest()}"


def queued_key(lane: str) -> str:
    """A sorted set of the lane's queued job ids (a tier's, for one of its models), scored by
    submit time."""
    return f"sdq:queued:{lane}"


#: Ended jobs whose objects are to go: member the job id, score when it ended (0: at once).
EXPIRY_KEY = "sdq:images:expiry"

# --- API keys ---------------------------------------------------------------------------
#: Every key, newest last: members ``<created_at in microseconds, 16 digits>:<key id>``, all
#: of score 0, so a lexicographic range is a stable page in creation order.
KEYS_INDEX = "sdq:apikeys"
#: Set once the keys made before the index existed were added to it.
KEYS_INDEXED = "sdq:apikeys:indexed"


def apikey_key(key_id: str) -> str:
    return f"sdq:apikey:{key_id}"


def apikey_by_hash_key(digest: str) -> str:
    """A key's id by the SHA-256 of the raw key."""
    return f"sdq:apikey-by-hash:{digest}"


def rate_key(key_id: str) -> str:
    """A key's request-rate state (``auth.lua``)."""
    return f"sdq:rate:{key_id}"


def key_jobs_key(key_id: str, status: JobStatus | str | None = None) -> str:
    """A key's jobs by creation time: all of them, or those in ``status`` (kept by the Lua
    steps, so a filtered listing reads only its own index)."""
    base = f"sdq:apikey:{key_id}:jobs"
    return base if status is None else f"{base}:{status}"


def usage_key(key_id: str | None, day: date | str) -> str:
    """The hash of ``key_id``'s usage on ``day`` (a date or ``YYYY-MM-DD``); the fleet's for
    ``None``."""
    owner = "fleet" if key_id is None else f"key:{key_id}"
    return f"sdq:usage:{owner}:{day if isinstance(day, str) else day.isoformat()}"


def fair_ring_key(lane: str, priority: str) -> str:
    """The keys with jobs waiting in a lane at a priority, in turn (``take.lua``)."""
    return f"sdq:fair:{lane}:{priority}"


def fair_list_key(lane: str, priority: str, key_id: str) -> str:
    """One key's jobs waiting in a lane at a priority, oldest first."""
    return f"{fair_ring_key(lane, priority)}:{key_id}"


# --- webhooks ---------------------------------------------------------------------------
#: Deliveries by when they are due, and the list that wakes the dispatchers.
DUE_KEY = "sdq:webhooks:due"
WAKE_KEY = "sdq:webhooks:wake"


def delivery_key(delivery_id: str) -> str:
    return f"sdq:webhook:{delivery_id}"


def attempts_key(delivery_id: str) -> str:
    return f"sdq:webhook:{delivery_id}:attempts"


def redeliver_key(job_id: str) -> str:
    """Held for ``webhook_redeliver_interval_seconds`` after a redelivery of the job."""
    return f"sdq:webhooks:redeliver:{job_id}"


# --- the fleet --------------------------------------------------------------------------
#: Each metric is a hash under this prefix, a field per label set.
METRICS_PREFIX = "sdq:metrics:"
#: The admin actions, a bounded stream.
AUDIT_KEY = "sdq:audit"
#: The reconciler's leader lock.
LEADER_KEY = "sdq:reconciler:leader"


#: The names the Lua steps use: a constant, or a function of the named arguments. Each is
#: built by the Python above, so the steps and the Python cannot drift apart.
LUA_NAMES: dict[str, str | tuple[Callable[..., str], tuple[str, ...]]] = {
    "RUNNING_KEY": RUNNING_KEY,
    "EXPIRY_KEY": EXPIRY_KEY,
    "DUE_KEY": DUE_KEY,
    "WAKE_KEY": WAKE_KEY,
    "METRICS_PREFIX": METRICS_PREFIX,
    "job_key": (job_key, ("id",)),
    "events_key": (events_key, ("id",)),
    "webhooks_key": (webhooks_key, ("id",)),
    "events_channel": (events_channel, ("id",)),
    "queued_key": (queued_key, ("lane",)),
    "fair_ring_key": (fair_ring_key, ("lane", "priority")),
    "fair_list_key": (fair_list_key, ("lane", "priority", "key_id")),
    "apikey_key": (apikey_key, ("id",)),
    "rate_key": (rate_key, ("id",)),
    "key_jobs_key": (key_jobs_key, ("key_id",)),
    "status_key": (key_jobs_key, ("key_id", "status")),
    "key_usage_key": (usage_key, ("key_id", "day")),
    "fleet_usage_key": (lambda day: usage_key(None, day), ("day",)),
    "delivery_key": (delivery_key, ("id",)),
    "attempts_key": (attempts_key, ("id",)),
}
