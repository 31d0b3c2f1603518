"""Several waiting jobs in one pipeline call, on tiers whose ``batch_images`` allow it.

A worker whose message took a job looks at the jobs waiting in the same lane and priority,
in their turn by key, and takes those whose call has the same shape (``Generation.shape``:
steps, size, guidance, scheduler, text to image) until the call holds ``batch_images``
images. Each job so taken is started with its own lease (then leaves its key's turn) and
keeps its own progress, cancel and result (``workers.execute.run_together``); its own
message later finds it running and has nothing to do. A worker that dies mid-call leaves
leases that run out, and the reconciler requeues those jobs like any other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from common.job import Job, JobStatus
from common.store import JobStore
from common.tiers import Tier
from workers.pipeline import Generation

log = logging.getLogger(__name__)

#: How many waiting jobs, at most, one worker reads to fill one call per image it may add.
SCAN_PER_IMAGE = 4


@dataclass(frozen=True)
class Member:
    """One job of a call, started: its record, its run's attempt and its generation."""

    job: Job
    attempt: int
    generation: Generation
    #: Seconds it waited in the queue, by the store's clock.
    waited: float


def gather(
    store: JobStore,
    first: Member,
    tier: Tier,
    *,
    clock: float,
    holder: str,
    plan: Callable[[Job, float], Generation | None],
) -> list[Member]:
    """The jobs that join ``first``'s call, each started as ``holder``, in turn by key.

    ``plan(job, waited)`` is the generation a waiting job would run with here, on the local
    pipeline, or ``None`` where it would not (a remote spill-over, a style that left the
    styles file). ``clock`` is the store's time when ``first`` started. Only jobs never run
    before join: one that its worker lost may be the one that killed it."""
    room = tier.batch_images - len(first.generation.seeds)
    shape = first.generation.shape
    if room <= 0 or shape is None:
        return []
    lane = first.job.lane or first.job.tier
    chosen: list[tuple[Job, Generation]] = []
    for job in store.get_many(store.waiting(lane, first.job.priority, room * SCAN_PER_IMAGE)):
        if (
            job is None
            or job.id == first.job.id
            or job.status is not JobStatus.QUEUED
            or job.attempts
            or job.request.num_images > room
        ):
            continue
        generation = plan(job, clock - job.created_at)
        if generation is None or generation.shape != shape:
            continue
        chosen.append((job, generation))
        room -= job.request.num_images
        if room == 0:
            break
    members = []
    for job, generation in chosen:
        # Started first, then out of its turn: a worker that dies in between leaves a
        # running job whose lease runs out, never a queued job that no turn reaches.
        started = store.start(job.id, holder=holder)
        if not started.applied or started.job is None or started.clock is None:
            state = started.current.value
            log.info("job %s: not started beside %s, it is %s", job.id, first.job.id, state)
            continue
        waited = started.clock - started.job.created_at
        members.append(Member(started.job, started.attempts, generation, waited))
    store.take_more([member.job.id for member in members])
    if members:
        log.info(
            "job %s: runs in one call with %s",
            first.job.id,
            ", ".join(member.job.id for member in members),
        )
    return members
