"""``l2u-relay``: run the local stack and operate the relay."""
import sys

import click

from workers import ops_commands
from workers.config import ConfigError, Settings
from workers.events import EVENT_TYPES
from workers.locate2u import commands as locate2u_commands
from workers.webhook_auth import webhook_url


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Locate2u webhook relay: receiver, workers and operations."""


@main.command()
@click.option("--port", type=int, default=None, help="Web port (default: $PORT or 8000).")
@click.option("--data-dir", default=None, help="Folder for the embedded Redis and local secret "
                                               "(default: $RELAY_DATA_DIR or .l2u-relay).")
def run(port, data_dir):
    """Run web, worker and beat locally; start an embedded Redis when REDIS_URL is unset."""
    from workers import devstack

    data_dir = data_dir or _env_or("RELAY_DATA_DIR", ".l2u-relay")
    port = port or int(_env_or("PORT", "8000"))
    env = devstack.local_environment(data_dir, port)
    settings = _settings(env)
    embedded = None
    if not env.get("REDIS_URL"):
        embedded = devstack.EmbeddedRedis(f"{data_dir}/redis").start()
        env["REDIS_URL"] = embedded.url
        click.echo(f"embedded Redis: {embedded.url} (data in {data_dir}/redis)")
    try:
        _print_urls(settings)
        code = devstack.run_processes(env)
    finally:
        if embedded:
            embedded.stop()
    sys.exit(code)


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
main.add_command(locate2u_commands.oauth)
main.add_command(locate2u_commands.whoami)
main.add_command(locate2u_commands.stops)
main.add_command(locate2u_commands.subscriptions)

if __name__ == "__main__":
    main()
