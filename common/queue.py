"""The broker contract both sides share: the Celery app's settings, queues and task names.

The producer sends tasks by name through this app; the workers register the tasks on it. A
job crosses the broker as its id only: the record lives in the job store.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from common.settings import Settings
from common.tiers import Tier, Tiers
from common.transport import NAME as REDIS_TRANSPORT
from common.transport import PRIORITY_SEP, PRIORITY_STEPS

GENERATE_TASK = "sdq.generate"
MAX_PRIORITY = PRIORITY_STEPS[-1]


def is_amqp(broker_url: str) -> bool:
    return broker_url.startswith(("amqp://", "amqps://", "pyamqp://"))


def broker_priority(priority: int, broker_url: str) -> int:
    """sdq's priority (9 runs first) as the broker counts it: RabbitMQ serves the highest
    number first, Celery's Redis transport the lowest."""
    return priority if is_amqp(broker_url) else MAX_PRIORITY - priority


def time_limits(tier: Tier, settings: Settings) -> tuple[float, float]:
    """A job's (hard, soft) time limits on ``tier``. At the soft one the task gets an
    exception (the job fails, refunded); at the hard one, a minute later, Celery replaces
    the pool child. Both stay below the visibility timeout."""
    hard_cap = settings.hard_time_limit
    soft = min(
        tier.time_limit(settings.soft_limit_base_seconds, settings.soft_limit_seconds_per_step),
        hard_cap * 0.9,
    )
    return min(soft + 60.0, hard_cap), soft


def make_celery(settings: Settings, tiers: Tiers) -> Celery:
    """A Celery app configured for sdq's reliability promises (docs/architecture.md)."""
    broker = settings.effective_broker_url
    amqp = is_amqp(broker)
    queue_arguments = {"x-max-priority": MAX_PRIORITY} if amqp else None
    app = Celery("sdq", broker=broker, set_as_current=False)
    app.conf.update(
        task_queues=[
            Queue(queue, routing_key=queue, queue_arguments=queue_arguments)
            for _tier, _model, _lane, queue in tiers.lanes()
        ],
        task_default_queue=tiers.get("normal").queue if "normal" in tiers.names else None,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # At-least-once: ack after the task ran, requeue when the worker process died.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            # Redis redelivers an unacked message after this long: it must exceed the
            # longest job plus its wait in the worker, or a running job runs twice.
            "visibility_timeout": settings.visibility_timeout_seconds,
            # kombu sweeps for expired unacked messages every interval x throttle seconds
            # (100 s by default): after a worker dies its job waited that long. Sweep often;
            # the scan reads one small sorted set.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_seconds // 4)),
            "unacked_restore_throttle": 1,
            # A sweep holds a lock that kombu keeps for 300 s if its holder dies mid-sweep
            # (a worker killed, or Valkey restarting before the release): no job was then
            # redelivered for five minutes (seen in the chaos run). A sweep takes
            # milliseconds; a stale lock now blocks the others for 10 s at most.
            "unacked_mutex_expire": 10,
            # One list per priority, read highest first by every BRPOP: with prefetch 1 a
            # worker's next job is the highest-priority one waiting (Redis transport only).
            "priority_steps": list(PRIORITY_STEPS),
            "sep": PRIORITY_SEP,
            "queue_order_strategy": "priority",
        },
        broker_transport=REDIS_TRANSPORT if broker.startswith("redis://") else None,
        broker_connection_retry_on_startup=True,
        # Ride out a broker restart when publishing (about 15 s) before giving up.
        task_publish_retry_policy={
            "max_retries": 10,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 2.0,
        },
        # A backstop for messages that carry no limits of their own (time_limits()).
        task_time_limit=settings.hard_time_limit,
        # The pipeline loads in worker_process_init; the parent must wait for it.
        worker_proc_alive_timeout=settings.worker_proc_alive_timeout,
        worker_max_tasks_per_child=settings.worker_max_tasks_per_child,
        worker_send_task_events=True,
        # No task-sent events: they double the cost of every publish on the submit path,
        # and Flower learns of each task from the worker's received/started events.
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
    )
    return app
