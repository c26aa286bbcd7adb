"""``actionDate`` instants to the nanosecond: Locate2u sends seven fractional digits (.NET's 100 ns
tick), and a ``datetime`` keeps six, so two changes within one microsecond would compare equal."""
import re
from datetime import datetime

_FRACTION = re.compile(r"[.,](\d+)")  # the only decimals of an ISO 8601 date-time: its seconds


def _nanos(text):
    """The fractional digits of ISO 8601 ``text`` as nanoseconds (beyond nine cut), 0 without any."""
    fraction = _FRACTION.search(text)
    return 0 if fraction is None else int(fraction.group(1)[:9].ljust(9, "0"))


def exact_text(moment, text):
    """``moment`` (an aware datetime parsed from ``text``) in ISO 8601 with every fractional digit of
    ``text`` up to nanoseconds, where ``moment.isoformat()`` would lose some."""
    fraction = _FRACTION.search(text) if isinstance(text, str) else None
    if fraction is None or len(fraction.group(1)) <= 6:
        return moment.isoformat()
    whole = moment.replace(microsecond=0).isoformat()  # 2022-04-27T14:16:40+10:00
    return f"{whole[:19]}.{fraction.group(1)[:9]}{whole[19:]}"


def exact_instant(text):
    """``(epoch seconds, nanoseconds)`` of aware ISO 8601 ``text``: ordered as the instants are."""
    seconds = int(datetime.fromisoformat(text).replace(microsecond=0).timestamp())
    return seconds, _nanos(text)
