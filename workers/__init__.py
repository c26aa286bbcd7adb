"""Everything behind the queue: Celery app, tasks, Locate2u client, sinks, stores, CLI."""
