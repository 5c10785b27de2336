"""Celery app and one thin consumer per pipeline stage."""
