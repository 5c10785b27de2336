"""Stage logic of chatpipe as plain Python: no Celery and no Starlette imports."""
