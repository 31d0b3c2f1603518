"""The one settings object: every knob of sdq, read from ``SDQ_*`` variables and ``.env``."""

from __future__ import annotations

from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common import production
from common.models import Model

#: Secrets that ship as defaults so the local stack runs with no configuration. Production
#: refuses to start with any of them (common/production.py).
DEV_S3_ACCESS = production.DEV_S3_ACCESS
DEV_S3_SECRET = production.DEV_S3_SECRET
#: False while `Settings.unchecked()` builds settings without the production checks.
_CHECKED: ContextVar[bool] = ContextVar("sdq_settings_checked", default=True)
#: The checkout this package runs from, when it is an editable install (None otherwise).
_CHECKOUT = Path(__file__).resolve().parent.parent
HOME_NAME = ".sdq"


def default_home(cwd: Path, checkout: Path | None = _CHECKOUT) -> Path:
    """The local stack's home when SDQ_HOME is not set: the nearest ``.sdq`` folder in
    ``cwd`` or above it, stopping at the root of the editable checkout sdq runs from; else
    that checkout's ``.sdq``; else ``cwd/.sdq`` (so `sdq down` works from another folder)."""
    if checkout is not None and not (checkout / "pyproject.toml").is_file():
        checkout = None  # an installed package (site-packages), not a checkout
    cwd = cwd.resolve()
    for folder in (cwd, *cwd.parents):
        if (folder / HOME_NAME).is_dir() or folder == checkout:
            return folder / HOME_NAME
    return (checkout or cwd) / HOME_NAME


class Settings(BaseSettings):
    """Configuration of every sdq process (API, worker, CLI, local stack)."""

    model_config = SettingsConfigDict(
        env_prefix="SDQ_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    env: Literal["development", "production"] = "development"
    home: Path = Field(
        default_factory=lambda: default_home(Path.cwd()),
        description="Local state: the embedded servers' data, pids, logs. Default: the nearest "
        ".sdq at or above the working folder, else the editable checkout's .sdq, else ./.sdq.",
    )

    # Redis-compatible job store, and the Celery broker (defaults to the same server).
    redis_url: str = "redis://127.0.0.1:6390/0"
    broker_url: str | None = None

    # S3-compatible object storage.
    storage_backend: Literal["s3", "local"] = "s3"
    local_storage_dir: Path | None = None
    s3_endpoint_url: str | None = "http://127.0.0.1:8333"
    s3_public_endpoint_url: str | None = None
    s3_bucket: str = "sdq"
    s3_region: str = "us-east-1"
    s3_access_key: str = DEV_S3_ACCESS
    s3_secret_key: SecretStr = SecretStr(DEV_S3_SECRET)
    s3_prefix: str = "images"
    presign_ttl_seconds: int = Field(3600, ge=60, le=7 * 86400)

    # Model and tiers.
    model: str | None = Field(
        None, description="Model id or local directory; defaults to the tiny model under home."
    )
    tiers_file: Path | None = None
    models_file: Path | None = None
    styles_file: Path | None = None
    model_sources: dict[str, str] = Field(
        default_factory=dict,
        description='Where each model loads from, by id (JSON: {"sd15": "/models/sd15"}); '
        "overrides the models file's source.",
    )
    runner: Literal["auto", "local", "remote"] = Field(
        "auto", description="remote: serve from the tier's remote API only (no model)."
    )
    torch_compile: bool = False
    overlap_upload: bool | None = Field(
        None,
        description="Encode and upload a job's images on a thread while the pipeline runs the "
        "next job; default: on where the model runs on a CUDA device.",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads of each worker's torch; default one per core. `sdq up` gives "
        "each worker its share of the cores.",
    )
    vae_model: str | None = Field(
        None, description="A VAE to swap in, e.g. madebyollin/sdxl-vae-fp16-fix for fp16."
    )
    model_variant: str | None = Field("fp16", description="Weights variant tried first on GPU.")
    compile_cache_dir: Path | None = Field(
        None,
        description="Persistent torch.compile (inductor, Triton) cache; default "
        "<home>/compile-cache.",
    )
    #: Serve a tier on a device class it does not list. Logged loudly; for operators only.
    hardware_override: bool = False

    # Jobs.
    job_ttl_seconds: int = Field(7 * 86400, ge=60)
    sync_timeout_seconds: float = Field(300.0, gt=0)
    max_deliveries: int = Field(3, ge=1)
    upload_retry_seconds: float = Field(60.0, ge=0, description="Keep retrying an upload.")
    visibility_timeout_seconds: int = Field(3600, ge=1)
    lease_seconds: float = Field(
        30.0,
        ge=1,
        description="A running job's lease in the store, renewed every third of it while it "
        "runs: a run whose lease ran out (its worker died) is taken over, not waited for.",
    )
    reconciler: bool = Field(True, description="Run the reconciler in the API (one leader).")
    reconcile_interval_seconds: float = Field(5.0, gt=0)
    stuck_ttl_seconds: int = Field(
        30 * 86400, ge=3600, description="A record that never ends expires after this."
    )
    task_time_limit_seconds: int = Field(
        3000, ge=10, description="Hard limit of one task; below the visibility timeout."
    )
    soft_limit_base_seconds: float = Field(
        120.0, gt=0, description="A job's time limit: this, plus the next setting's share."
    )
    soft_limit_seconds_per_step: float = Field(
        2.0, gt=0, description="Per step of a tier's largest job (max steps, size, images)."
    )
    remote_deadline_seconds: float = Field(
        900.0, gt=0, description="The whole remote path of a job, retries and waits included."
    )
    worker_proc_alive_timeout: float = Field(300.0, gt=0)
    worker_max_tasks_per_child: int | None = Field(None, ge=1)

    # The remote Hotpot-compatible fallback.
    remote_fallback: bool = Field(
        False,
        description="Opt in to sending jobs to the tiers' remote APIs (with SDQ_REMOTE_API_KEY). "
        "Off, no prompt ever leaves this deployment.",
    )
    remote_api_key: SecretStr | None = None
    remote_timeout_seconds: float = Field(120.0, gt=0)
    remote_max_attempts: int = Field(4, ge=1)
    remote_retry_base_seconds: float = Field(1.0, gt=0)
    circuit_failures: int = Field(5, ge=1, description="Consecutive failures that open it.")
    circuit_cooldown_seconds: float = Field(30.0, gt=0)

    # Webhooks.
    webhook_allow_loopback: bool = Field(
        False, description="Allow 127.0.0.0/8 and ::1 receivers (local development, tests)."
    )
    webhook_timeout_seconds: float = Field(10.0, gt=0)
    webhook_retry_base_seconds: float = Field(5.0, gt=0)
    webhook_retry_max_seconds: float = Field(6 * 3600.0, gt=0)
    webhook_max_age_seconds: float = Field(86400.0, gt=0, description="Retry for this long.")
    webhook_concurrency: int = Field(8, ge=1)
    webhook_dispatcher: bool = Field(True, description="Run the dispatcher in the API process.")
    webhook_max_response_bytes: int = Field(
        65536, ge=0, description="Read at most this much of a receiver's answer."
    )
    webhook_per_host_concurrency: int = Field(
        2, ge=1, description="Sends at once to one receiver host, across this dispatcher."
    )
    webhook_dns_timeout_seconds: float = Field(2.0, gt=0)
    webhook_redeliver_interval_seconds: float = Field(
        10.0, ge=0, description="A job's webhooks may be redelivered once per this long."
    )
    idempotency_ttl_seconds: int = Field(86400, ge=60)

    # Tenants: bounds on every request, and the per-key limits a key gets unless set on it.
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Bodies of /v1/jobs and more.")
    max_batch_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="/v1/batches.")
    max_form_body_bytes: int = Field(64 * 1024, ge=1024, description="Hotpot forms.")
    max_form_fields: int = Field(32, ge=1, description="Parts of one Hotpot form.")
    max_image_body_bytes: int = Field(
        12 * 1024 * 1024,
        ge=1024,
        description="Bodies that carry an input image (init_image, seedImage), on the routes "
        "that take one.",
    )
    max_init_image_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="An input image, decoded (PNG, JPEG or WebP)."
    )
    max_init_image_side: int = Field(
        4096, ge=64, description="Pixels on either side of an input image (a decompression cap)."
    )
    body_timeout_seconds: float = Field(
        30.0, gt=0, description="A request body must arrive within this long (408)."
    )
    default_rate_per_second: float = Field(
        20.0, gt=0, description="Requests a key may make per second (bursts of as many)."
    )
    default_max_jobs: int = Field(1000, ge=1, description="A key's jobs queued or running.")
    default_max_priority: int = Field(
        5, ge=0, le=9, description="Higher priorities asked for are capped at this."
    )
    streams_per_key: int = Field(20, ge=1, description="Event streams and sync waits a key holds.")
    streams_per_process: int = Field(2000, ge=1, description="The same, for one API process.")
    stream_max_seconds: float = Field(900.0, gt=0, description="An event stream ends after this.")
    api_header_timeout_seconds: float = Field(
        10.0, gt=0, description="A request line and headers must arrive within this long."
    )
    api_max_connections: int = Field(
        4000, ge=1, description="Connections one API process holds; more are answered 503."
    )

    # Redis clients: a dead server or a half-open connection is noticed within this long.
    redis_socket_timeout_seconds: float = Field(15.0, gt=0)

    # Network addresses of the local stack.
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_keep_alive_seconds: int = Field(
        75,
        ge=1,
        description="How long the API keeps an idle HTTP connection open. Keep it above the "
        "idle timeout of any load balancer in front (60 s on AWS ALB): uvicorn's 5 s default "
        "makes the balancer, or a pooled client, send on a connection just being closed.",
    )
    flower_host: str = "127.0.0.1"
    flower_port: int = 5555
    flower_basic_auth: SecretStr | None = Field(
        None, description="user:password for Flower; required when it listens beyond loopback."
    )

    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token of the admin API (/admin/v1); the admin API is off unless "
        "set. At least 32 characters in production.",
    )
    free_credits: int = Field(
        0, ge=0, description="Credits of a key created without --credits (or credits)."
    )
    webhook_secret_overlap_seconds: float = Field(
        86400.0,
        ge=0,
        description="After a webhook secret is rotated, the old one still signs (beside the new "
        "one) for this long.",
    )
    image_ttl_seconds: int | None = Field(
        None,
        ge=1,
        description="Images are deleted this long after their job ended (a bucket lifecycle "
        "rule where the S3 server has one, a sweeper where not); defaults to SDQ_JOB_TTL_SECONDS.",
    )
    metrics_token: SecretStr | None = Field(
        None,
        description="Bearer token /metrics asks for; required in production unless "
        "SDQ_METRICS_PORT serves the metrics on a port of their own.",
    )
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Serve /metrics on this port of its own."
    )
    bench: bool = Field(False, description="Register the benchmark tasks on workers.")

    log_level: str = "INFO"
    log_json: bool = Field(False, description="One JSON object per log line.")

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        # Resolved once, here: `sdq down` and `sdq ps` find the stack from any folder.
        return home.expanduser().resolve()

    @classmethod
    def unchecked(cls) -> Settings:
        """The settings without the production checks: for a start-up step whose own refusal
        must come first (a worker's hardware check names what to change on the machine)."""
        token = _CHECKED.set(False)
        try:
            return cls()
        finally:
            _CHECKED.reset(token)

    @model_validator(mode="after")
    def _refuse_placeholders(self) -> Settings:
        if not _CHECKED.get():
            return self
        if self.env == "production":
            refused = production.problems(self)
            if refused:
                # One line per setting, all at once: the operator fixes the file in one pass.
                raise ValueError("\n".join(refused))
        if self.storage_backend == "local" and self.local_storage_dir is None:
            raise ValueError("SDQ_STORAGE_BACKEND=local needs SDQ_LOCAL_STORAGE_DIR")
        return self

    @property
    def delivery_ttl_seconds(self) -> int:
        """How long a webhook delivery's record and attempts are kept: well past its last
        retry, so its owner can still read why it failed."""
        return int(self.webhook_max_age_seconds * 9)

    @property
    def effective_image_ttl(self) -> int:
        """How long images outlive their job's end: SDQ_IMAGE_TTL_SECONDS, else the job's."""
        return self.image_ttl_seconds or self.job_ttl_seconds

    @property
    def hard_time_limit(self) -> float:
        """The task's hard limit, kept below the visibility timeout: a job still running when
        the broker redelivers its message would run twice."""
        return float(min(self.task_time_limit_seconds, self.visibility_timeout_seconds * 0.9))

    @property
    def remote_enabled(self) -> bool:
        """Whether jobs may go to a tier's remote API: opted in, and with a key to send."""
        return self.remote_fallback and self.remote_api_key is not None

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    def tiny_dir(self, family: str) -> Path:
        """Where `sdq models build-tiny` writes the tiny pipeline of ``family``."""
        return self.home / "models" / f"tiny-{family}"

    def model_source(self, model: Model) -> str:
        """Where ``model`` loads from: SDQ_MODEL_SOURCES, else SDQ_MODEL for the sdxl model,
        else in development the tiny pipeline of its family under home, else the models
        file's source."""
        if model.id in self.model_sources:
            return self.model_sources[model.id]
        if model.id == "sdxl" and self.model is not None:
            return self.model
        if self.env == "development":
            return str(self.tiny_dir(model.family))
        return model.source


def refusals(exc: ValidationError) -> list[str]:
    """The lines of an invalid settings error, each naming its setting (``SDQ_X ...``):
    a field's own error gets its name put in front; a production refusal is its lines."""
    lines = []
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["loc"]:
            lines.append(f"SDQ_{str(error['loc'][0]).upper()}: {message}")
        else:
            lines += message.splitlines()
    return lines


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
