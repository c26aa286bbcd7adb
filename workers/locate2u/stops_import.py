"""Bulk stop import: read a CSV or JSON file, validate every row, create the valid ones in batches.

CSV: one stop per row; nested fields are dotted columns (``contact.name``,
``location.latitude``, ``customFields.colour``); empty cells are left out.
Headers are matched ignoring case, spaces, ``_``, ``-`` and ``.`` (``Contact Name``,
``contact_name`` and ``contact.name`` are one column), and common synonyms are
taken (``COLUMNS``: ``phone``, ``lat``, ``date``…). Header problems (an unknown
column, two columns for one field, ``name`` or ``address`` missing) are reported
together, with the accepted columns, before any row is read or sent.
JSON: an array of stop objects. Rows are validated with marshmallow before
anything is sent, each problem reported with its line (and a JSON item's number) and field; valid rows
go to ``POST /v1/Stops/import`` in batches. A batch that fails is reported
row by row and not retried on 5xx (the import may have partly applied).
"""
import csv
import dataclasses
import io
import json

import redis
from marshmallow import Schema, ValidationError, fields, validate

from workers.resilience.errors import BadAnswer, NoAnswer, RelayError
from workers.locate2u.tokens import ReauthorizationRequired

DEFAULT_BATCH = 100
MAX_BATCH = 500  # the most the API takes in one import call
_NOT_BLANK = validate.Regexp(r"\S", error="Must not be blank.")
EXTRA_VALUES = "(values beyond the header)"
_TIME = validate.Regexp(r"^([01]\d|2[0-3]):[0-5]\d$", error="Must be a time as HH:MM.")


class ImportFileError(ValueError):
    """The file cannot be read as stops at all (not a row problem)."""


# Every CSV column: the field, then the synonyms a header may use instead. Required: name, address.
COLUMNS = {
    "name": ("stop name", "title"),
    "address": ("street address", "full address"),
    "contact.name": ("contact", "contact person"),
    "contact.phone": ("phone", "phone number", "mobile", "telephone"),
    "contact.email": ("email", "email address"),
    "location.latitude": ("latitude", "lat"),
    "location.longitude": ("longitude", "lng", "lon", "long"),
    "tripDate": ("trip date", "date", "delivery date"),
    "appointmentTime": ("appointment", "appointment time"),
    "timeWindowStart": ("window start", "time from"),
    "timeWindowEnd": ("window end", "time to"),
    "durationMinutes": ("duration", "duration minutes", "service minutes"),
    "notes": ("note", "comments", "instructions"),
    "type": (),
    "source": (),
    "sourceReference": ("reference", "ref"),
    "customerId": ("customer", "customer id"),
}
REQUIRED_COLUMNS = ("name", "address")
OPEN_COLUMNS = ("customFields", "load")  # customFields.<any name>, load.<any name>


def _squash(header):
    """A header as compared: lower case, without spaces, ``_``, ``-`` and ``.``."""
    return "".join(ch for ch in header.lower() if ch not in " _-.\t")


_BY_SQUASHED = {_squash(alias): column for column, aliases in COLUMNS.items() for alias in (column, *aliases)}


def columns_help():
    """The accepted columns, one per line, with their synonyms (for ``--help`` and header errors)."""
    lines = [f"{column}{' (required)' if column in REQUIRED_COLUMNS else ''}"
             + (f": also {', '.join(aliases)}" if aliases else "") for column, aliases in COLUMNS.items()]
    return lines + [f"{prefix}.NAME: any {prefix} entry" for prefix in OPEN_COLUMNS]


def map_header(headers):
    """``{header: field column}`` for a CSV header row; ImportFileError listing every problem at once."""
    mapping, problems, taken = {}, [], {}
    for header in headers:
        head, dot, member = header.strip().partition(".")
        open_prefix = next((p for p in OPEN_COLUMNS if _squash(head) == _squash(p)), None)
        column = f"{open_prefix}.{member.strip()}" if open_prefix and dot and member.strip() \
            else _BY_SQUASHED.get(_squash(header))
        if column is None:
            problems.append(f"unknown column {header!r}")
        elif column in taken:
            problems.append(f"columns {taken[column]!r} and {header!r} are both {column}")
        else:
            mapping[header], taken[column] = column, header
    problems += [f"no {column} column" for column in REQUIRED_COLUMNS if column not in taken]
    if problems:
        raise ImportFileError("header: " + "; ".join(problems) + ".\nAccepted columns (case, spaces, _ and . "
                              "ignored):\n  " + "\n  ".join(columns_help()))
    return mapping


class _IdField(fields.String):
    """A string id; a JSON integer is taken as its decimal string."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        return super()._deserialize(value, attr, data, **kwargs)


class ContactSchema(Schema):
    name = fields.String(allow_none=True)
    phone = fields.String(allow_none=True)
    email = fields.Email(allow_none=True)


class LocationSchema(Schema):
    latitude = fields.Float(required=True, validate=validate.Range(-90, 90))
    longitude = fields.Float(required=True, validate=validate.Range(-180, 180))


class StopRowSchema(Schema):
    """A stop as ``POST /v1/Stops`` accepts it; unknown fields are errors (typos show up)."""

    name = fields.String(required=True, validate=_NOT_BLANK)
    address = fields.String(required=True, validate=_NOT_BLANK)
    contact = fields.Nested(ContactSchema, allow_none=True)
    location = fields.Nested(LocationSchema, allow_none=True)
    tripDate = fields.Date(allow_none=True)
    appointmentTime = fields.String(allow_none=True, validate=_TIME)
    timeWindowStart = fields.String(allow_none=True, validate=_TIME)
    timeWindowEnd = fields.String(allow_none=True, validate=_TIME)
    durationMinutes = fields.Integer(allow_none=True, validate=validate.Range(min=0))
    notes = fields.String(allow_none=True)
    type = fields.String(allow_none=True)
    source = fields.String(allow_none=True)
    sourceReference = fields.String(allow_none=True)
    customerId = _IdField(allow_none=True)
    customFields = fields.Dict(keys=fields.String(), allow_none=True)
    load = fields.Dict(keys=fields.String(), allow_none=True)


@dataclasses.dataclass(frozen=True, order=True)
class Place:
    """Where a row is in its file: the line it starts on and, for an item of a JSON array, its number
    (1 for the first; 0 for a CSV row). Items on one line, as in minified JSON, differ only by it."""
    line: int
    item: int = 0

    def __str__(self):
        return f"line {self.line}, item {self.item}" if self.item else f"line {self.line}"


@dataclasses.dataclass(frozen=True)
class RowError:
    place: Place
    field: str
    message: str

    def __str__(self):
        return f"{self.place}: {self.field}: {self.message}"


@dataclasses.dataclass
class ImportReport:
    """Created stops as (Place, stopId), every problem as a RowError, as ``unconfirmed`` RowErrors the
    rows of a request that got no usable answer (they may have been created, so importing them again
    could create them twice: the API has no lookup to check first), and the Places of valid rows
    ``not_sent`` (all of them until the import ends, the rest when something stops it)."""

    created: list = dataclasses.field(default_factory=list)
    errors: list = dataclasses.field(default_factory=list)
    unconfirmed: list = dataclasses.field(default_factory=list)
    not_sent: list = dataclasses.field(default_factory=list)

    @property
    def failed_rows(self):
        return len({error.place for error in self.errors})

    def summary(self):
        summary = f"created {len(self.created)}, failed {self.failed_rows}"
        if self.unconfirmed:
            summary += (f", unconfirmed {len(self.unconfirmed)} (the request got no usable answer: the stops may have "
                        "been created; look in Locate2u before importing those rows again)")
        if self.not_sent:
            summary += (f", not sent {len(self.not_sent)} (from {self.not_sent[0]} on: import them once the "
                        "problem is fixed)")
        return summary


# --- reading -------------------------------------------------------------------

def read_rows(path):
    """The file's rows as ``[(Place, row)]``; JSON when it starts with ``[``, CSV otherwise."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportFileError(f"cannot read {path}: {exc}") from None
    return _json_rows(text) if text.lstrip().startswith("[") else _csv_rows(text)


def _delimiter(text):
    """The header line's delimiter: a comma, unless it holds none and a ';' (Excel where the decimal
    mark is a comma) or a tab (Excel's "Text (Tab delimited)")."""
    header = text.partition("\n")[0]
    if "," in header:
        return ","
    return next((mark for mark in (";", "\t") if mark in header), ",")


def _csv_rows(text):
    """Rows with the line each starts on (a quoted cell may span lines)."""
    reader = csv.DictReader(io.StringIO(text), delimiter=_delimiter(text), restkey=EXTRA_VALUES)
    rows = []
    try:
        if not reader.fieldnames:
            raise ImportFileError("the CSV file has no header row")
        columns = {**map_header(reader.fieldnames), EXTRA_VALUES: EXTRA_VALUES}
        start = reader.line_num + 1
        for row in reader:
            rows.append((Place(start), _nest({columns[k]: v for k, v in row.items() if v not in ("", None)})))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise ImportFileError(f"CSV error at line {reader.line_num}: {exc}") from None
    return rows


def _nest(flat):
    """``{"contact.name": v}`` as ``{"contact": {"name": v}}``; ImportFileError for two columns of which
    one names a value and the other a field inside it."""
    nested = {}
    for key, value in flat.items():
        *parents, leaf = key.strip().split(".")
        target = nested
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise _clash(flat, key)
        if isinstance(target.get(leaf), dict):
            raise _clash(flat, key)
        target[leaf] = value
    return nested


def _clash(flat, key):
    """The ImportFileError for column ``key`` and the column of ``flat`` it clashes with."""
    name = key.strip()
    other = next(column for column in flat if column != key and (
        name.startswith(column.strip() + ".") or column.strip().startswith(name + ".")))
    outer, inner = sorted((key, other), key=len)
    return ImportFileError(f"columns {outer} and {inner} clash: one holds a value, the other a field inside it")


def _json_rows(text):
    """The items of a top-level JSON array, each with its Place (the line it starts on, its number)."""
    decoder, rows = json.JSONDecoder(), []
    pos = _skip(text, text.index("[") + 1)
    line, counted = 1, 0
    while text[pos:pos + 1] != "]":
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise ImportFileError(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        except RecursionError:
            raise ImportFileError(f"invalid JSON at line {line}: nested too deeply") from None
        rows.append((Place(line, len(rows) + 1), item))
        pos = _skip(text, end)
        if text[pos:pos + 1] == ",":
            pos = _skip(text, pos + 1)
        elif text[pos:pos + 1] != "]":
            raise ImportFileError(f"invalid JSON after item {len(rows)} (starting on line {line}): "
                                  "expected ',' or ']'")
    if text[pos + 1:].strip():
        raise ImportFileError("unexpected content after the JSON array")
    return rows


def _skip(text, pos):
    return len(text) - len(text[pos:].lstrip()) if pos < len(text) else pos


# --- validating and sending ------------------------------------------------------

def validate_rows(rows):
    """Split ``[(Place, row)]`` into valid API payloads ``[(Place, stop)]`` and RowErrors."""
    schema, valid, errors = StopRowSchema(), [], []
    for place, row in rows:
        try:
            valid.append((place, schema.dump(schema.load(row))))
        except ValidationError as exc:
            errors += [RowError(place, name, message) for name, message in _flatten(exc.messages)]
    return valid, errors


def _flatten(messages, prefix=""):
    """``(field, message)`` of marshmallow's nested ``messages``; a problem with a whole object (its
    ``_schema``) is the object's own field (``contact``, not ``contact.row``), the row's at the top."""
    if isinstance(messages, list):
        yield prefix or "row", "; ".join(map(str, messages))
        return
    for key, value in messages.items():
        yield from _flatten(value, prefix if key == "_schema" else f"{prefix}.{key}" if prefix else key)


def import_stops(client, rows, batch_size=DEFAULT_BATCH, progress=lambda count: None, report=None):
    """Validate ``rows`` and create the valid ones in batches; return the ImportReport (``report``
    when given: it holds what was done when an error or an interrupt stops the import).

    ``progress(count)`` is told how many rows are done (invalid ones at once).
    """
    if not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch size must be between 1 and {MAX_BATCH}")
    valid, errors = validate_rows(rows)
    report = ImportReport() if report is None else report
    report.errors += sorted(errors, key=lambda error: error.place)
    report.not_sent = [place for place, _ in valid]
    progress(len(rows) - len(valid))
    for start in range(0, len(valid), batch_size):
        batch = valid[start:start + batch_size]
        _send(client, batch, report)
        del report.not_sent[:len(batch)]
        progress(len(batch))
    report.errors.sort(key=lambda error: error.place)
    return report


def _send(client, batch, report):
    try:
        answer = client.import_stops([stop for _, stop in batch])
    except (ReauthorizationRequired, redis.RedisError):
        raise  # from the token, before the request could go (or after a 401): the batch was not created
    except RelayError as exc:
        if _may_have_landed(exc):
            report.unconfirmed += [RowError(place, "row", f"may have been created: {exc.message}") for place, _ in batch]
        else:
            report.errors += [RowError(place, "row", f"not imported: {exc.message}") for place, _ in batch]
        return
    except BaseException:  # an interrupt (Ctrl-C) while the request was out, or a bug
        del report.not_sent[:len(batch)]
        report.unconfirmed += [RowError(place, "row", "may have been created: interrupted while its request was out")
                               for place, _ in batch]
        raise
    failed = {item["index"]: item.get("errors") or {"row": ["rejected by Locate2u"]}
              for item in answer.get("failed", [])}
    places = [place for index, (place, _) in enumerate(batch) if index not in failed]
    created = answer.get("created") or []
    if len(created) != len(places):  # which id is whose is unknown: none of these rows is confirmed
        report.unconfirmed += [RowError(place, "row", f"may have been created: the answer lists {len(created)} "
                                                      f"created for the {len(places)} rows it did not refuse")
                               for place in places]
    else:
        report.created += list(zip(places, created))
    for index, messages in sorted(failed.items()):
        report.errors += [RowError(batch[index][0], name, message) for name, message in _flatten(messages)]


def _may_have_landed(error):
    """Whether the request behind ``error`` may have been applied: sent without a usable answer, or
    answered 5xx (a gateway's 502/504 come after the API may have run it); a 4xx or 429 refused it."""
    return isinstance(error, (NoAnswer, BadAnswer)) or (error.status or 0) >= 500
