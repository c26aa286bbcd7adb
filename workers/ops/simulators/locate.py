"""Loopback simulator of the LOCATE inventory core API (generic resources).

Enforces the rules of the seed (``locate-inventory-core-api.txt``) and of
``downstream-facts.md``:

- every request needs ``Accept: application/json`` and every write (POST,
  PUT, PATCH, DELETE) also ``Content-Type: application/json``; otherwise the
  answer is a 302 redirect to ``/login`` (an HTML page), as the real server does;
- HTTP Basic auth with the API key as user and password, else 401
  ``{"message": "Unauthenticated."}``;
- lists paginate (``perPage`` 0..100, default 100; ``page`` >= 1; else 422),
  filter (simple ``?field=value`` and advanced ``filter=``), ``sort``,
  limit ``fields`` (``id`` is always kept) and hide soft-deleted records
  unless ``withTrashed=1``;
- ``customeraddress`` (our documented default resource) is validated: 422;
- writes honour ``X-Background-Processing: always|never``; a backgrounded
  write answers 202 with an empty body and is applied ``background_delay``
  seconds later. All dates are UTC ISO 8601.

Simulator assumptions (LOCATE does not publish these):

- ``POST /{resource}/{id}/restore`` restores a soft-deleted record;
- create answers 201 with the record; update, delete and restore answer 200
  with the record; a soft-deleted record is 404 for PUT and DELETE, and for
  GET without ``withTrashed=1``;
- validation (422) and existence (404) are checked before a write is
  backgrounded, so they are always synchronous;
- ``background = "auto"`` (used when the header is absent or neither
  ``always`` nor ``never``) backgrounds every second write;
- ``perPage=0`` answers the envelope (with ``total``) but no rows;
- advanced filters support ``( ) && || = != > >= < <= IS NULL IS NOT NULL``
  and ``%`` wildcards with ``=``/``!=``; anything else is a 422;
- ``requests_log`` holds every request except ``/_sim/`` and ``/login``,
  including faulted and rejected ones.
"""
import math
import operator
import re
import threading
from datetime import datetime, timezone
from urllib.parse import urlencode

from flask import Response, jsonify, redirect, request

from workers.ops.simulators.base import method_path_query_body_headers, run_main, simulator_app

MAX_PER_PAGE = 100
WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
LIST_PARAMS = {"perPage", "page", "sort", "fields", "withTrashed", "filter", "embed"}
READ_ONLY_FIELDS = {"id", "created_at", "updated_at", "deleted_at"}
LOGGED_HEADERS = ("Accept", "Content-Type", "X-Background-Processing")
UNGUARDED = ("/_sim/", "/login")  # neither logged nor checked for auth and headers
INVALID = "The given data was invalid."
NOT_FOUND = {"message": "Not found"}
LOGIN_PAGE = "<!DOCTYPE html><html><head><title>LOCATE | Login</title></head><body>Login</body></html>"

# Laravel-style validation rules per resource; a field without "required"
# may be absent, null or "" (Laravel turns "" into null).
VALIDATION = {
    "customeraddress": {
        "name": ("required", "string"),
        "address1": ("required", "string"),
        "remote_key": ("string", "max:191"),
        "latitude": ("numeric",),
        "longitude": ("numeric",),
    },
}


def utc_now():
    """Current time as LOCATE serves it: UTC ISO 8601 with microseconds."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def is_number(value):
    """True for finite numbers and numeric strings (never for booleans)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


# ---------------------------------------------------------------- validation

# rule name -> (check(value, argument), message template)
RULE_CHECKS = {
    "string": (lambda value, _: isinstance(value, str), "The {attr} must be a string."),
    "numeric": (lambda value, _: is_number(value), "The {attr} must be a number."),
    "max": (lambda value, limit: not isinstance(value, str) or len(value) <= int(limit),
            "The {attr} may not be greater than {arg} characters."),
}


def first_violation(field, rules, value):
    """The message for the first rule ``value`` breaks, or None."""
    attr = field.replace("_", " ")
    if value is None or value == "":
        return f"The {attr} field is required." if "required" in rules else None
    for rule in rules:
        name, _, arg = rule.partition(":")
        if name in RULE_CHECKS:
            check, template = RULE_CHECKS[name]
            if not check(value, arg):
                return template.format(attr=attr, arg=arg)
    return None


def validate(rules, data, partial=False):
    """Laravel-style ``{field: [message]}`` errors; ``partial`` skips absent fields."""
    errors = {}
    for field, field_rules in rules.items():
        if field not in data and (partial or "required" not in field_rules):
            continue
        message = first_violation(field, field_rules, data.get(field))
        if message:
            errors[field] = [message]
    return errors


# ------------------------------------------------------- filtering & sorting

COMPARATORS = {"=": operator.eq, "!=": operator.ne, ">": operator.gt,
               ">=": operator.ge, "<": operator.lt, "<=": operator.le}


def _scalar(value):
    return int(value) if isinstance(value, bool) else value


def compare(actual, op, expected, wildcards=True):
    """Compare a record value with a filter value the way LOCATE does.

    Numbers compare numerically, anything else as case-insensitive strings;
    ``%`` is a wildcard for ``=``/``!=``; null never compares true.
    """
    actual = _scalar(actual)
    if actual is None:
        return False
    if is_number(actual) and is_number(expected):
        return COMPARATORS[op](float(actual), float(expected))
    left, right = str(actual).lower(), str(expected).lower()
    if wildcards and "%" in right and op in ("=", "!="):
        pattern = ".*".join(re.escape(part) for part in right.split("%"))
        return (re.fullmatch(pattern, left, re.DOTALL) is not None) == (op == "=")
    return COMPARATORS[op](left, right)


class FilterError(ValueError):
    """An advanced filter the simulator cannot parse (answered with 422)."""


_FILTER_TOKEN = re.compile(r"""\s*(?:
      (?P<lparen>\() | (?P<rparen>\)) | (?P<and>&&) | (?P<or>\|\|)
    | (?P<null>(?i:IS\s+NOT\s+NULL|IS\s+NULL))\b
    | (?P<op>!=|>=|<=|=|>|<)
    | "(?P<dquoted>[^"]*)" | '(?P<squoted>[^']*)'
    | (?P<word>[\w.%:+-]+)
)""", re.VERBOSE)


def tokenize_filter(text):
    """Split an advanced filter into ``(kind, value)`` tokens."""
    tokens, pos, text = [], 0, text.strip()
    while pos < len(text):
        match = _FILTER_TOKEN.match(text, pos)
        if not match:
            raise FilterError(f"Unexpected input in filter at position {pos}: {text[pos:pos + 20]!r}")
        kind, value = match.lastgroup, match.group(match.lastgroup)
        if kind in ("dquoted", "squoted"):
            kind = "value"
        elif kind == "null":
            value = " ".join(value.upper().split())
        tokens.append((kind, value))
        pos = match.end()
    return tokens


class FilterParser:
    """Recursive descent over the filter grammar; ``parse()`` returns a predicate.

    expr := conj ('||' conj)* ; conj := atom ('&&' atom)* ;
    atom := '(' expr ')' | field 'IS [NOT] NULL' | field op value
    """

    def __init__(self, text):
        self.tokens = tokenize_filter(text)
        self.pos = 0

    def parse(self):
        if not self.tokens:
            raise FilterError("The filter is empty.")
        predicate = self._expr()
        if self.pos != len(self.tokens):
            raise FilterError(f"Unexpected {self.tokens[self.pos][1]!r} in filter.")
        return predicate

    def _peek(self):
        return self.tokens[self.pos][0] if self.pos < len(self.tokens) else None

    def _take(self, *kinds):
        if self._peek() not in kinds:
            found = self.tokens[self.pos][1] if self.pos < len(self.tokens) else "end of filter"
            raise FilterError(f"Expected {' or '.join(kinds)} in filter, found {found!r}.")
        self.pos += 1
        return self.tokens[self.pos - 1][1]

    def _expr(self):
        parts = [self._conj()]
        while self._peek() == "or":
            self._take("or")
            parts.append(self._conj())
        return lambda record: any(part(record) for part in parts)

    def _conj(self):
        parts = [self._atom()]
        while self._peek() == "and":
            self._take("and")
            parts.append(self._atom())
        return lambda record: all(part(record) for part in parts)

    def _atom(self):
        if self._peek() == "lparen":
            self._take("lparen")
            inner = self._expr()
            self._take("rparen")
            return inner
        field = self._take("word")
        if self._peek() == "null":
            want_null = self._take("null") == "IS NULL"
            return lambda record: (record.get(field) is None) == want_null
        op = self._take("op")
        value = self._take("value", "word")
        return lambda record: compare(record.get(field), op, value)


def _sort_key(value):
    value = _scalar(value)
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, (int, float)):
        return (1, float(value), "")
    return (2, 0.0, str(value).lower())


def sort_records(records, spec):
    """Sort in place by ``spec`` such as ``"name,-id"`` (stable multi-key)."""
    for key in reversed([key.strip() for key in spec.split(",") if key.strip()]):
        field = key.lstrip("-")
        records.sort(key=lambda record: _sort_key(record.get(field)), reverse=key.startswith("-"))
    return records


def limit_fields(record, spec):
    """Keep only the fields listed in ``spec`` (comma separated) plus ``id``."""
    if not spec:
        return record
    wanted = {"id"} | {name.strip() for name in spec.split(",")}
    return {name: value for name, value in record.items() if name in wanted}


# --------------------------------------------------------------------- state

class LocateState:
    """Thread-safe in-memory LOCATE company: ``records[resource][id] = record``."""

    def __init__(self, api_key="locate-test-key", resources=("customeraddress",), background_delay=0.0):
        self.api_key = api_key
        self.records = {name: {} for name in resources}
        self.background = "never"
        self.background_delay = background_delay
        self.requests_log = []
        self.lock = threading.RLock()
        self._auto_writes = 0
        self._timers = []

    def rows(self, resource, with_trashed=False):
        """Copies of a resource's records in id order."""
        with self.lock:
            return [dict(record) for _, record in sorted(self.records[resource].items())
                    if with_trashed or record["deleted_at"] is None]

    def get(self, resource, record_id, with_trashed=False):
        """A copy of one record, or None (also None when soft-deleted, unless ``with_trashed``)."""
        with self.lock:
            record = self.records.get(resource, {}).get(record_id)
            if record is None or (record["deleted_at"] and not with_trashed):
                return None
            return dict(record)

    def create(self, resource, fields):
        """Store a new record (no validation) and return a copy."""
        with self.lock:
            table = self.records[resource]
            now = utc_now()
            record_id = max(table, default=0) + 1
            table[record_id] = {"id": record_id, **_writable(fields),
                                "created_at": now, "updated_at": now, "deleted_at": None}
            return dict(table[record_id])

    def update(self, resource, record_id, fields):
        """Change a live record; KeyError when it is missing or soft-deleted."""
        return self._change(resource, record_id, dict(_writable(fields)))

    def delete(self, resource, record_id):
        """Soft delete a live record; KeyError when it is missing or already deleted."""
        return self._change(resource, record_id, {"deleted_at": utc_now()})

    def restore(self, resource, record_id):
        """Clear ``deleted_at`` of a record (live or not); KeyError when missing."""
        return self._change(resource, record_id, {"deleted_at": None}, with_trashed=True)

    def _change(self, resource, record_id, changes, with_trashed=False):
        with self.lock:
            if self.get(resource, record_id, with_trashed) is None:
                raise KeyError(record_id)
            record = self.records[resource][record_id]
            record.update(changes, updated_at=utc_now())
            return dict(record)

    def should_background(self, header):
        """Whether a write is backgrounded, given its X-Background-Processing header."""
        mode = (header or "").strip().lower()
        if mode not in ("always", "never"):
            mode = self.background
        if mode == "auto":
            with self.lock:
                self._auto_writes += 1
                return self._auto_writes % 2 == 0
        return mode == "always"

    def schedule(self, apply):
        """Run ``apply`` after ``background_delay`` s; a vanished record is ignored."""
        def run():
            try:
                apply()
            except KeyError:
                pass
        timer = threading.Timer(self.background_delay, run)
        timer.daemon = True
        with self.lock:
            self._timers.append(timer)
        timer.start()

    def wait_background(self, timeout=5.0):
        """Wait for scheduled background writes; True when all have been applied."""
        with self.lock:
            timers = list(self._timers)
        for timer in timers:
            timer.join(timeout)
        return not any(timer.is_alive() for timer in timers)


def _writable(fields):
    return {name: value for name, value in fields.items() if name not in READ_ONLY_FIELDS}


# ----------------------------------------------------------------------- app

def _invalid(errors):
    return jsonify({"message": INVALID, "errors": errors}), 422


def _body():
    body = request.get_json(silent=True)
    return body if isinstance(body, dict) else {}


def _int_param(name, default, low, high=None):
    """``(value, error message)`` for an integer query parameter."""
    raw = request.args.get(name, "")
    if raw == "":
        return default, None
    try:
        value = int(raw)
    except ValueError:
        return None, f"The {name} must be an integer."
    if value < low:
        return None, f"The {name} must be at least {low}."
    if high is not None and value > high:
        return None, f"The {name} may not be greater than {high}."
    return value, None


def _page_url(page):
    args = request.args.to_dict(flat=False)
    args["page"] = [str(page)]
    return f"{request.base_url}?{urlencode(args, doseq=True)}"


def _with_trashed():
    return request.args.get("withTrashed", "").lower() in ("1", "true")


def _wants_json():
    return any(mimetype == "application/json" and quality > 0
               for mimetype, quality in request.accept_mimetypes)


def create_app(state=None):
    """Build the LOCATE simulator app around ``state`` (a fresh LocateState by default)."""
    state = state or LocateState()
    app = simulator_app(__name__, state, method_path_query_body_headers(*LOGGED_HEADERS), unlogged=UNGUARDED)
    app.json.sort_keys = False

    @app.before_request
    def _guard():
        if request.path.startswith(UNGUARDED):
            return None
        needs_content_type = request.method in WRITE_METHODS
        if not _wants_json() or (needs_content_type and request.mimetype != "application/json"):
            return redirect(request.host_url + "login", 302)
        auth = request.authorization
        if not (auth and auth.type == "basic" and auth.username == state.api_key
                and auth.password == state.api_key):
            response = jsonify({"message": "Unauthenticated."})
            response.status_code = 401
            response.headers["WWW-Authenticate"] = 'Basic realm="LOCATE"'
            return response
        return None

    @app.errorhandler(404)
    def _not_found(_error):
        return jsonify(NOT_FOUND), 404

    @app.errorhandler(405)
    def _not_allowed(_error):
        return jsonify({"message": "Method not allowed."}), 405

    @app.get("/login")
    def login_page():
        return Response(LOGIN_PAGE, mimetype="text/html")

    def known(resource):
        return resource in state.records

    def write(apply, status=200):
        """Apply now, or answer 202 with no body and apply in the background."""
        if state.should_background(request.headers.get("X-Background-Processing")):
            state.schedule(apply)
            return Response(status=202)
        return jsonify(apply()), status

    @app.get("/<resource>")
    def list_records(resource):
        if not known(resource):
            return jsonify(NOT_FOUND), 404
        per_page, per_page_error = _int_param("perPage", MAX_PER_PAGE, 0, MAX_PER_PAGE)
        page, page_error = _int_param("page", 1, 1)
        errors = {name: [message] for name, message in (("perPage", per_page_error), ("page", page_error))
                  if message}
        if errors:
            return _invalid(errors)
        try:
            matches = FilterParser(request.args["filter"]).parse() if request.args.get("filter") else None
        except FilterError as exc:
            return _invalid({"filter": [str(exc)]})
        simple = [(name, value) for name, value in request.args.items() if name not in LIST_PARAMS]
        rows = [record for record in state.rows(resource, _with_trashed())
                if all(compare(record.get(name), "=", value, wildcards=False) for name, value in simple)
                and (matches is None or matches(record))]
        sort_records(rows, request.args.get("sort", ""))
        total = len(rows)
        last_page = max(1, math.ceil(total / per_page)) if per_page else 1
        start = (page - 1) * per_page
        data = [limit_fields(record, request.args.get("fields")) for record in rows[start:start + per_page]]
        return jsonify({
            "total": total, "per_page": per_page, "current_page": page, "last_page": last_page,
            "next_page_url": _page_url(page + 1) if per_page and page < last_page else None,
            "prev_page_url": _page_url(page - 1) if page > 1 else None,
            "from": start + 1 if data else None, "to": start + len(data) if data else None,
            "data": data,
        })

    @app.post("/<resource>")
    def create_record(resource):
        if not known(resource):
            return jsonify(NOT_FOUND), 404
        body = _body()
        errors = validate(VALIDATION.get(resource, {}), body)
        if errors:
            return _invalid(errors)
        return write(lambda: state.create(resource, body), 201)

    @app.get("/<resource>/<int:record_id>")
    def get_record(resource, record_id):
        record = state.get(resource, record_id, _with_trashed())
        if record is None:
            return jsonify(NOT_FOUND), 404
        return jsonify(limit_fields(record, request.args.get("fields")))

    @app.put("/<resource>/<int:record_id>")
    def update_record(resource, record_id):
        if state.get(resource, record_id) is None:
            return jsonify(NOT_FOUND), 404
        body = _body()
        errors = validate(VALIDATION.get(resource, {}), body, partial=True)
        if errors:
            return _invalid(errors)
        return write(lambda: state.update(resource, record_id, body))

    @app.delete("/<resource>/<int:record_id>")
    def delete_record(resource, record_id):
        if state.get(resource, record_id) is None:
            return jsonify(NOT_FOUND), 404
        return write(lambda: state.delete(resource, record_id))

    @app.post("/<resource>/<int:record_id>/restore")
    def restore_record(resource, record_id):
        if state.get(resource, record_id, with_trashed=True) is None:
            return jsonify(NOT_FOUND), 404
        return write(lambda: state.restore(resource, record_id))

    return app


if __name__ == "__main__":
    run_main(create_app, "LOCATE simulator")
