"""``l2u-relay stops import PATH [--dry-run]``: the command over ``stops_import``.

Exit codes as for every Locate2u command: 0 all created (or all valid, with
``--dry-run``); 1 some rows failed or are unconfirmed (their request got no
usable answer, so they may have been created); 2 a configuration problem, an
unreadable file or a header problem (reported before anything is sent); 3
re-authorisation required.
"""
import click
from tqdm import tqdm

from workers.locate2u.commands import EXIT_CONFIG, EXIT_FAILED, _context, _fail, _reported
from workers.locate2u.stops_import import (DEFAULT_BATCH, MAX_BATCH, ImportFileError, ImportReport, columns_help,
                                           import_stops, read_rows, validate_rows)

PROGRESS_MIN_ROWS = 500
HELP = "\n\n".join([
    "Create the stops in PATH (CSV or JSON); report every bad row; exit 1 if any failed, or may have been "
    "created without a usable answer saying so (unconfirmed: look in Locate2u before importing those again).",
    "CSV: commas, or ';' or tabs when the header line has none (as Excel writes in some locales). "
    "CSV headers are matched ignoring case, spaces, _ and . (Contact Name, contact_name and contact.name are "
    "the same column); empty cells are left out. A header problem stops the import before anything is sent. "
    "A sample file: docs/stops-sample.csv.",
    "\b\nColumns:\n  " + "\n  ".join(columns_help()),
    "JSON: an array of stop objects with the field names above, nested (contact: {name: …}).",
])


@click.command("import", help=HELP)
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH), default=DEFAULT_BATCH, show_default=True,
              help="Stops per import request.")
@click.option("--dry-run", is_flag=True, help="Check the file and every row; send nothing (needs no Locate2u "
                                              "credentials).")
@_reported
def stops_import(path, batch_size, dry_run):
    try:
        rows = read_rows(path)
    except ImportFileError as exc:
        _fail(str(exc), EXIT_CONFIG)
    if dry_run:
        valid, errors = validate_rows(rows)
        for error in errors:
            click.echo(str(error))
        click.echo(f"dry run: {len(valid)} row(s) valid, {len({e.place for e in errors})} failed; nothing sent")
    else:
        _, _, client = _context()
        report = ImportReport()
        try:
            with tqdm(total=len(rows), unit="row", disable=True if len(rows) < PROGRESS_MIN_ROWS else None) as bar:
                import_stops(client, rows, batch_size, progress=bar.update, report=report)
        finally:  # also when an error or Ctrl-C stops it: what was created, what may have been, what was not sent
            errors = report.errors + report.unconfirmed
            for error in errors:
                click.echo(str(error))
            click.echo(report.summary())
    if errors:
        click.get_current_context().exit(EXIT_FAILED)
