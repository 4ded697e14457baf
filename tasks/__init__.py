"""The Celery boundary: app, per-process runtime, thin task entry points, signal hooks."""
