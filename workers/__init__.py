"""What GPU workers run: the Celery app, device detection, the SDXL runner, the tasks."""
