"""``l2u-relay``: run the local stack and operate the relay."""
import contextlib
import functools
import sys

import click

from workers import ops_commands
from workers.config import ConfigError, Settings
from workers.locate2u import commands as locate2u_commands
from workers.webhook_auth import webhook_url


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Locate2u webhook relay: receiver, workers and operations."""


@main.command()
@click.option("--port", type=int, default=None, help="Web port (default: $PORT or 8000).")
@click.option("--data-dir", default=None, help="Folder for the embedded Redis and local secret "
                                               "(default: $RELAY_DATA_DIR or .l2u-relay).")
@click.option("--demo-then-exit", is_flag=True,
              help="Demo mode only: stop once the demo day is applied; exit 0 if every system holds what it should.")
def run(port, data_dir, demo_then_exit):
    """Run web, worker and beat locally; start an embedded Redis when REDIS_URL is unset.

    With no Locate2u credentials (LOCATE2U_CLIENT_ID unset) this is demo mode: loopback simulators of
    Locate2u and every downstream system, a delivery day sent through the real receiver, and a summary
    of what each system then holds.
    """
    from workers import devstack

    data_dir = data_dir or _env_or("RELAY_DATA_DIR", ".l2u-relay")
    port = port or int(_env_or("PORT", "8000"))
    env = devstack.local_environment(data_dir, port)
    with contextlib.ExitStack() as stack:
        demo = None if env.get("LOCATE2U_CLIENT_ID") else stack.enter_context(_demo_systems())
        if demo:
            env.update(demo.env())
        settings = _settings(env)
        if not env.get("REDIS_URL"):
            embedded = stack.enter_context(devstack.EmbeddedRedis(f"{data_dir}/redis"))
            env["REDIS_URL"] = embedded.url
            click.echo(f"embedded Redis: {embedded.url} (data in {data_dir}/redis)")
        _print_urls(settings)
        names, on_start = devstack.LOCAL_PROCESSES, None
        if demo:
            flower_url = f"http://127.0.0.1:{devstack.free_port()}"
            env.update(FLOWER_ADDRESS="127.0.0.1", FLOWER_PORT=flower_url.rsplit(":", 1)[1])
            names += ("flower",)
            on_start = functools.partial(_start_demo, demo, env, settings.public_url, flower_url, demo_then_exit)
        code = devstack.run_processes(env, names, on_start)
    sys.exit(code)


def _demo_systems():
    from workers.demo import DemoSystems

    click.echo("DEMO MODE: no Locate2u credentials are set, so Locate2u and every downstream system are "
               "simulated on loopback (set LOCATE2U_CLIENT_ID and LOCATE2U_CLIENT_SECRET for the real thing)")
    try:
        return DemoSystems()
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None


def _start_demo(demo, env, web_url, flower_url, then_exit, stop):
    from workers.demo import DemoDriver

    def done(ok):
        if then_exit:
            stop(0 if ok else 1)

    DemoDriver(demo, env, web_url, flower_url, done, echo=lambda line: click.echo(line)).start()


def _print_urls(settings):
    base = settings.public_url
    click.echo(f"receiver: {base}  (health: {base}/healthz, ready: {base}/readyz)")
    click.echo("webhook URLs to register with Locate2u:")
    for event_type in settings.event_types:
        click.echo(f"  {event_type:<24} {webhook_url(base, settings.webhook_secret, event_type)}")
    click.echo("press Ctrl-C to stop everything")


def _env_or(name, default):
    import os

    return os.environ.get(name) or default


def _settings(environ=None):
    """Settings from the environment, or exit 2 with every problem listed."""
    try:
        return Settings.from_env(environ)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


main.add_command(ops_commands.dlq)
main.add_command(ops_commands.deliveries)
main.add_command(ops_commands.reconcile)
main.add_command(ops_commands.status)
main.add_command(locate2u_commands.oauth)
main.add_command(locate2u_commands.whoami)
main.add_command(locate2u_commands.stops)
main.add_command(locate2u_commands.subscriptions)

if __name__ == "__main__":
    main()
