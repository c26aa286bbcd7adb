"""A WSGI app that answers how many objects its process froze (``gc.get_freeze_count()``), to serve
with the project's gunicorn settings."""
import gc


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(gc.get_freeze_count()).encode()]
