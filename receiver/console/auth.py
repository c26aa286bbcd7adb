"""Console login: operators from settings, constant-time checks, attempts limited per client IP in Redis
(behind Heroku's router, the client's address it passes on: ``workers.dyno.router``)."""
import functools
import hmac
import ipaddress
import secrets

from flask import current_app, redirect, render_template, request, session, url_for
from flask_wtf.csrf import CSRFError
from werkzeug.security import check_password_hash, generate_password_hash

from receiver.console.blueprint import bp, csrf, record_action, runtime
from workers.dyno.router import router_clients
from workers.store import keys

SHARED_PASSWORD_OPERATOR = "admin"  # the name that goes with RELAY_CONSOLE_PASSWORD
LOGIN_ATTEMPTS = 10
LOGIN_WINDOW_SECONDS = 300
OPEN_ENDPOINTS = ("console.login", "console.static")
_DECOY_PASSWORD = "no operator has this password"


def operators(settings):
    """``{name: werkzeug password hash}`` of ``RELAY_CONSOLE_OPERATORS``."""
    return dict(entry.partition(":")[::2] for entry in settings.console_operators)


def check_login(settings, name, password):
    """True when ``name`` and ``password`` match the shared password or an operator's hash."""
    if settings.console_password and hmac.compare_digest(name.encode(), SHARED_PASSWORD_OPERATOR.encode()):
        return hmac.compare_digest(password.encode(), settings.console_password.encode())
    known = operators(settings)
    # An unknown name costs a hash check too, so the answer time does not tell names apart.
    matches = check_password_hash(known.get(name) or decoy_hash(tuple(known.values())), password)
    return matches and name in known


@functools.lru_cache(maxsize=4)
def decoy_hash(hashes):
    """A hash to check an unknown name's password against, made the way the first of the operators'
    ``hashes`` was (its method and cost: pbkdf2 or scrypt), so it costs what a known name costs.
    An scrypt decoy beside pbkdf2 operators answered an unknown name in a third of the time."""
    method = hashes[0].split("$", 1)[0] if hashes else "scrypt"
    return generate_password_hash(_DECOY_PASSWORD, method=method)


def _client_addresses():
    """Where this request comes from: behind Heroku's router the client it passes on (two addresses
    when the request carried several X-Forwarded-For headers), else the address the web process sees."""
    return router_clients(request.path, request.headers) or [request.remote_addr]


def _counted_as(address):
    """What attempts from ``address`` count against: an IPv6 address's /64 (one client's network,
    2**64 addresses to rotate through), else the address itself."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    return str(ipaddress.ip_network((ip, 64), strict=False)) if ip.version == 6 else address


def _count_attempt():
    """Count a login attempt from each of this request's client addresses; return the seconds to wait
    when one of them is over the limit, else 0."""
    client, wait = runtime().redis, 0
    for address in _client_addresses():
        key = keys.console_login(_counted_as(address))
        with client.pipeline() as pipe:
            pipe.incr(key)
            pipe.ttl(key)
            attempts, ttl = pipe.execute()
        if ttl < 0:  # the window starts at the first attempt
            client.expire(key, LOGIN_WINDOW_SECONDS)
            ttl = LOGIN_WINDOW_SECONDS
        wait = max(wait, max(ttl, 1) if attempts > LOGIN_ATTEMPTS else 0)
    return wait


@bp.before_request
def _require_login():
    csrf.protect()
    if request.endpoint not in OPEN_ENDPOINTS and not _logged_in():
        session.clear()
        return redirect(url_for("console.login", next=request.full_path if request.method == "GET" else None))
    return None


def _logged_in():
    """Whether the session's login still has its record in Redis: it expires
    ``RELAY_CONSOLE_SESSION_MINUTES`` after the login however often the cookie is used (Flask signs the
    cookie anew on each request), and logout deletes it (a copy of the cookie kept from before opened
    the console)."""
    login_id, operator = session.get("login"), session.get("operator")
    return bool(login_id and operator) and runtime().redis.get(keys.console_session(login_id)) == operator


@bp.errorhandler(CSRFError)
def _bad_csrf(exc):
    record_action("refused_csrf", 0, reason=exc.description)
    return render_template("console/error.html", title="Form expired",
                           message=f"The form could not be accepted ({exc.description}). "
                                   "Go back, reload the page and try again."), 400


@bp.route("/login", methods=["GET", "POST"])
def login():
    next_page = _safe_next(request.values.get("next"))
    if request.method == "GET":
        return render_template("console/login.html", next=next_page)
    wait = _count_attempt()
    if wait:
        record_action("login_limited", 0, ip=", ".join(_client_addresses()))
        return render_template("console/login.html", next=next_page,
                               error=f"Too many login attempts from this address; try again in {wait} s."), 429
    name, password = request.form.get("name", ""), request.form.get("password", "")
    settings = current_app.extensions["l2u.settings"]
    if not check_login(settings, name, password):
        record_action("login_failed", 0, ip=", ".join(_client_addresses()))
        return render_template("console/login.html", next=next_page, name=name,
                               error="Unknown name or wrong password."), 401
    runtime().redis.delete(*[keys.console_login(_counted_as(address)) for address in _client_addresses()])
    session.clear()
    session.permanent = True
    session["operator"], session["login"] = name, secrets.token_urlsafe(16)
    runtime().redis.set(keys.console_session(session["login"]), name, ex=settings.console_session_minutes * 60)
    record_action("login", 1)
    return redirect(next_page or url_for("console.overview"))


@bp.post("/logout")
def logout():
    record_action("logout", 1)
    runtime().redis.delete(keys.console_session(session.get("login", "")))
    session.clear()
    return redirect(url_for("console.login"))


def _safe_next(target):
    """Only a path inside the console: never an open redirect."""
    if target and target.startswith("/console/") and not target.startswith("/console//") and "\\" not in target:
        return target.rstrip("?")
    return None
