"""``l2u-relay``: run the local stack and operate the relay.

Every command but ``run`` first takes the settings of a ``l2u-relay run`` still
running in this checkout (``<data dir>/stack.json``) as defaults for what the
environment does not set. A configuration problem ends any command with one
message naming the setting and exit 2; so does a Redis that cannot be reached,
or a system the command reads (a sink during ``reconcile``) that fails.
"""
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

import click
import redis

from workers.ops import commands as ops_commands
from workers.config import ConfigError
from workers.resilience.errors import RelayError
from workers.locate2u import commands as locate2u_commands
from workers.locate2u import stops_command
from workers.locate2u.webhook_auth import webhook_url

EXIT_CONFIG = 2


class RelayGroup(click.Group):
    """Turns configuration problems, an unreachable Redis and a system a command reads that failed
    (``RelayError``: a sink during ``reconcile``) into one message and exit 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            click.echo(f"error: {exc}\n  set them in the environment (README, Configuration), or run the command in "
                       "this checkout while `l2u-relay run` is running there", err=True)
        except redis.ConnectionError as exc:
            click.echo(f"error: Redis cannot be reached at {_redis_location()}: {exc}\n"
                       "  start it (l2u-relay run starts one in this checkout) or fix REDIS_URL", err=True)
        except redis.RedisError as exc:
            click.echo(f"error: Redis at {_redis_location()} failed: {type(exc).__name__}: {exc}", err=True)
        except RelayError as exc:
            click.echo(f"error: {exc.message}", err=True)
        ctx.exit(EXIT_CONFIG)


def _redis_location():
    parts = urlsplit(os.environ.get("REDIS_URL") or "")
    return parts.hostname and f"{parts.hostname}:{parts.port or 6379}" or "REDIS_URL"


@click.group(cls=RelayGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def main(ctx):
    """Locate2u webhook relay: receiver, workers and operations.

    Commands run in a checkout where ``l2u-relay run`` is running use its settings (Redis, sinks, Locate2u)
    for anything the environment does not set.
    """
    if ctx.invoked_subcommand != "run":
        from workers.ops.devstack import stack_environment

        for name, value in stack_environment(os.environ).items():
            os.environ.setdefault(name, value)


@main.command()
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Web port (default: $PORT, else 8000 or a free one if 8000 is taken).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the web process listens on (0.0.0.0 for every interface).")
@click.option("--data-dir", default=None, help="Folder for the embedded Redis, local secret, stack settings and "
                                               "demo logs (default: $RELAY_DATA_DIR or .l2u-relay).")
@click.option("--demo-then-exit", is_flag=True,
              help="Demo mode only: stop once the demo day is applied; exit 0 if every system holds what it should.")
@click.option("-v", "--verbose", is_flag=True, help="Demo mode: stream the processes' logs here instead of to "
                                                    "the log file.")
def run(port, host, data_dir, demo_then_exit, verbose):
    """Run web, worker and beat locally; start an embedded Redis when REDIS_URL is unset.

    With no Locate2u credentials (LOCATE2U_CLIENT_ID unset) this is demo mode: loopback simulators of
    Locate2u and every downstream system, a Redis of its own emptied at start (REDIS_URL is not used),
    a delivery day sent through the real receiver, progress while the workers settle it, and a summary
    of what each system then holds. The processes' logs go to DATA_DIR/demo.log (-v streams them).

    The settings the processes use are written to DATA_DIR/stack.json (secrets only as where to re-read
    them), so other l2u-relay commands in this checkout find the stack.
    """
    from workers.ops import devstack

    data_dir = Path(data_dir or os.environ.get("RELAY_DATA_DIR") or devstack.DEFAULT_DATA_DIR).resolve()
    port = _free_web_port(host, port or _port_from_environment())
    try:
        claim = devstack.claim_data_dir(data_dir)  # held until this process ends
    except devstack.DataDirUnavailable as exc:
        raise click.UsageError(str(exc)) from None
    env = devstack.local_environment(data_dir, port)
    env.setdefault("GUNICORN_CMD_ARGS", f"--bind {host}:{port}")
    demo_mode = not env.get("LOCATE2U_CLIENT_ID")
    console_line = devstack.local_console(env)
    with claim, devstack.LocalStack(data_dir, env, demo=demo_mode, verbose=verbose, echo=click.echo) as stack:
        click.echo(console_line)
        if not demo_mode:
            _print_urls(stack.settings)
        code = stack.run(demo_then_exit)
    sys.exit(code)


def _port_from_environment():
    """``$PORT`` as a number, None when unset; a UsageError when it is not a port."""
    from workers.ops.devstack import port_number

    value = os.environ.get("PORT")
    try:
        return port_number(value) if value else None
    except ValueError as exc:
        raise click.UsageError(f"PORT {exc}") from None


def _free_web_port(host, port):
    """``port`` when given and free (else exit 2 naming it); with none given, 8000 or a free one. Exit 2
    too when ``host`` cannot be listened on at all."""
    from workers.ops.devstack import free_port, port_in_use

    try:
        if port is not None:
            if port_in_use(host, port):
                raise click.UsageError(f"port {port} is already in use on {host}: stop what uses it, or choose "
                                       "another with --port (or PORT)")
            return port
        if port_in_use(host, 8000):
            port = free_port()
            click.echo(f"port 8000 is already in use; the receiver uses port {port} instead (--port chooses one)")
            return port
        return 8000
    except OSError as exc:  # not "in use": the address itself cannot be listened on
        raise click.UsageError(f"cannot listen on {host}: {exc.strerror} (--host takes an address of this "
                               "machine, or 0.0.0.0 for every interface)") from None


def _print_urls(settings):
    base = settings.public_url
    click.echo(f"receiver: {base}  (health: {base}/healthz, ready: {base}/readyz)")
    click.echo("webhook URLs to register with Locate2u:")
    for event_type in settings.event_types:
        click.echo(f"  {event_type:<24} {webhook_url(base, settings.webhook_secret, event_type)}")
    click.echo("press Ctrl-C to stop everything")


main.add_command(ops_commands.dlq)
main.add_command(ops_commands.deliveries)
main.add_command(ops_commands.quarantine)
main.add_command(ops_commands.reconcile)
main.add_command(ops_commands.status)
main.add_command(locate2u_commands.oauth)
main.add_command(locate2u_commands.whoami)
main.add_command(locate2u_commands.stops)
locate2u_commands.stops.add_command(stops_command.stops_import)
main.add_command(locate2u_commands.subscriptions)

if __name__ == "__main__":
    main()
