"""JSON error answers, so every rejection says what is wrong in the same shape."""
from flask import g, jsonify
from werkzeug.exceptions import HTTPException


def error_response(status, error, message, retry_after=None, headers=None, **extra):
    """A JSON error: ``{"error": code, "message": text, ...extra}`` (the code also in ``g.l2u_error``,
    for the metrics, which then need not parse the answer again)."""
    g.l2u_error = error
    response = jsonify({"error": error, "message": message, **extra})
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def init_app(app):
    @app.errorhandler(HTTPException)
    def _http_error(exc):
        """Werkzeug's errors as JSON, keeping their headers (``Allow`` on a 405)."""
        code = (exc.name or "error").lower().replace(" ", "_")
        headers = {name: value for name, value in exc.get_headers() if name.lower() != "content-type"}
        if exc.code == 405:
            return error_response(405, code, f"{exc.description} Allowed: {headers.get('Allow', 'none')}.",
                                  headers=headers)
        if exc.code == 413:
            limit = app.config["MAX_CONTENT_LENGTH"]
            return error_response(413, code, f"request body is larger than the limit of {limit} bytes",
                                  headers=headers)
        return error_response(exc.code or 500, code, exc.description or exc.name, headers=headers)
