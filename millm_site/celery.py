"""The Celery app: downloads of models and SAEs run here, never inside a web request."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "millm_site.settings")

app = Celery("millm_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
