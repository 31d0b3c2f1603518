"""The Celery app of the workers: the shared broker contract plus the tasks.

``celery -A workers.celery_app`` (Flower, inspection) and ``sdq worker`` both use this module.
It imports no torch: the pipeline loads in each pool child, never in the parent.
"""

from __future__ import annotations

from common.queue import make_celery
from common.settings import get_settings
from common.tiers import load_tiers

settings = get_settings()
app = make_celery(settings, load_tiers(settings.tiers_file))
app.conf.imports = ["workers.tasks"]
