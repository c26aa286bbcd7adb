"""One exception root for everything that goes wrong talking to another system.

``RetriableError``: trying again later may succeed (429, 5xx, timeouts, lost
connections, a 2xx whose body is not the API's answer, credentials refused);
the pipeline retries it on its schedule. ``PermanentError``: trying again will
not help (other 4xx, data a sink cannot accept); it goes to the dead-letter
store at once.
``NotYet``: the write waits without spending an attempt (the sink's own reason,
not the remote's health). Both keep the request and the answer that caused
them, so a dead letter explains itself. Configuration problems are
``ConfigError`` (also importable from ``workers.config``), outside this
hierarchy, so nothing swallows them.
"""
BODY_LIMIT = 2000


class RelayError(Exception):
    """Root of the relay's errors about external systems."""

    retriable = False
    #: One endpoint's failure while another endpoint of the same sink answers (the signed forward's
    #: URLs): not the sink's failure, so its breaker is not told and the others keep getting messages.
    others_answer = False

    def __init__(self, message, *, status=None, body=None, method=None, url=None, retry_after=None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.body = body[:BODY_LIMIT] if isinstance(body, str) else body
        self.method = method
        self.url = url
        self.retry_after = retry_after

    def to_json(self):
        """What a dead letter or a log line keeps of this error."""
        return {"error": type(self).__name__, "message": self.message, "status": self.status, "body": self.body,
                "method": self.method, "url": self.url}


class RetriableError(RelayError):
    """Safe to retry later: the request may not have taken effect, and every write is an upsert."""

    retriable = True


class NoAnswer(RetriableError):
    """Sent, but no answer came (a read timeout, a dropped connection): the remote system may still
    apply it for ``settles_in`` seconds from now (the client's ``settle_seconds`` after it was sent)."""

    def __init__(self, message, *, settles_in, **details):
        super().__init__(message, **details)
        self.settles_in = settles_in


class BadAnswer(RetriableError):
    """Answered, but not with what the API documents: a 2xx body that is not JSON or lacks the field
    read (a proxy's or load balancer's own page), or a body not read whole (broken off, undecodable,
    too long, still coming in when the exchange's time was up). The request may have taken effect,
    so like one without an answer it is retried, and it counts against the remote's health; unlike
    one, it is over there (nothing still in flight). ``status`` stays None: it is not a refusal."""


class CredentialsRefused(RetriableError):
    """The remote system refused the relay's credentials (401, 403): a token rotated or revoked there,
    a password changed. Nothing about this request: every one fails so until an operator sets working
    credentials, so it is held for the remote's health (breaker, recovery probe) like an outage, and
    never retried in place."""


class PermanentError(RelayError):
    """Retrying the same request cannot succeed; dead-letter it with this reason."""


class NotFound(PermanentError):
    """The remote system has no such record (HTTP 404 or the vendor's equivalent)."""


class NotYet(RelayError):
    """Not a failure of the remote system: this write must wait ``retry_after`` seconds (an earlier
    attempt may still take effect there). The same attempt runs again then; the breaker is not told."""


class ConfigError(Exception):
    """Invalid configuration; ``problems`` maps variable name to message."""

    def __init__(self, problems):
        self.problems = problems
        lines = [f"  - {name}: {message}" for name, message in sorted(problems.items())]
        super().__init__("invalid configuration:\n" + "\n".join(lines))
