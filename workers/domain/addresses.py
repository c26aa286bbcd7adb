"""Splitting a Locate2u stop's one-line address into parts.

US addresses go through ``usaddress`` (a trained CRF parser). Anything it
cannot tag, or that names a country other than the US, is reported as such
(``us=False``), so a sink that needs a US address can refuse it precisely.
For sinks that only want a city and postal code (B2B), ``locality_parts``
falls back to the comma structure of an international address.
"""
import dataclasses

import usaddress

US_COUNTRY_NAMES = frozenset({"us", "usa", "u.s.", "u.s.a.", "united states", "united states of america"})
# Countries a trailing address part commonly names; recognised before parsing, since
# usaddress mis-tags foreign addresses rather than naming their country.
OTHER_COUNTRY_NAMES = frozenset({
    "australia", "new zealand", "canada", "mexico", "united kingdom", "uk", "england", "scotland", "wales",
    "ireland", "france", "germany", "spain", "portugal", "italy", "netherlands", "belgium", "switzerland",
    "austria", "sweden", "norway", "denmark", "finland", "poland", "india", "singapore", "malaysia",
    "philippines", "indonesia", "japan", "china", "hong kong", "south africa", "brazil", "argentina",
    "chile", "united arab emirates", "uae"})
US_STATES = frozenset(
    "AL AK AZ AR CA CO CT DE DC FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH NJ NM NY NC ND "
    "OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY PR VI GU AS MP".split())

STREET_LABELS = ("AddressNumberPrefix", "AddressNumber", "AddressNumberSuffix", "StreetNamePreModifier",
                 "StreetNamePreDirectional", "StreetNamePreType", "StreetName", "StreetNamePostType",
                 "StreetNamePostDirectional", "StreetNamePostModifier")
UNIT_LABELS = ("OccupancyType", "OccupancyIdentifier", "SubaddressType", "SubaddressIdentifier")
# USPS directionals (Publication 28), spelled out -> abbreviated, so "South" and "S" compare equal
DIRECTIONALS = {"NORTH": "N", "SOUTH": "S", "EAST": "E", "WEST": "W", "NORTHEAST": "NE", "NORTHWEST": "NW",
                "SOUTHEAST": "SE", "SOUTHWEST": "SW"}


@dataclasses.dataclass(frozen=True)
class AddressParts:
    street: str = ""
    unit: str = ""
    city: str = ""
    state: str = ""
    zip_code: str = ""
    country: str = ""
    us: bool = False
    problem: str = ""


def _join(tagged, labels):
    return " ".join(tagged[label].strip(" ,") for label in labels if tagged.get(label)).strip()


def _trailing_country(text):
    """The country a trailing comma-separated part names, when it is a known non-US one."""
    last = text.rsplit(",", 1)[-1].strip(" .")
    return last if "," in text and last.lower() in OTHER_COUNTRY_NAMES else ""


def split_us_address(text):
    """Parse ``text`` as a US address; ``problem`` says why it is not one when ``us`` is False.

    ``zip_code`` is the five-digit part of a ZIP+4 as written (never truncated), so a
    malformed ZIP stays visible to the caller's checks.
    """
    if not text or not text.strip():
        return AddressParts(problem="the address is empty")
    country = _trailing_country(text)
    if country:
        return AddressParts(country=country, problem=f"the address is not in the US (country {country!r})")
    try:
        tagged, kind = usaddress.tag(text)
    except usaddress.RepeatedLabelError:
        return AddressParts(problem="the address could not be parsed as a US address")
    country = tagged.get("CountryName", "").strip(" ,")
    parts = AddressParts(street=_join(tagged, STREET_LABELS), unit=_join(tagged, UNIT_LABELS),
                         city=tagged.get("PlaceName", "").strip(" ,"), state=tagged.get("StateName", "").strip(" ,"),
                         zip_code=tagged.get("ZipCode", "").strip(" ,").split("-")[0], country=country)
    if country and country.lower() not in US_COUNTRY_NAMES:
        return dataclasses.replace(parts, problem=f"the address is not in the US (country {country!r})")
    if kind != "Street Address":
        return dataclasses.replace(parts, problem=f"the address is a {kind.lower()}, not a street address")
    if parts.state.upper() not in US_STATES:
        return dataclasses.replace(parts, problem=f"no US state found in the address (got {parts.state!r})")
    return dataclasses.replace(parts, state=parts.state.upper(), country="US", us=True)


def locality_parts(text):
    """``(city, postal_code)`` for any address: the US parser first, else its comma structure.

    ``"55 Miller St, Pyrmont NSW 2009, Australia"`` gives ``("Pyrmont", "2009")``.
    """
    parts = split_us_address(text)
    if parts.us:
        return parts.city, parts.zip_code
    pieces = [piece.strip() for piece in (text or "").split(",") if piece.strip()]
    if len(pieces) >= 2 and not any(ch.isdigit() for ch in pieces[-1]):
        pieces = pieces[:-1]  # drop a trailing country name
    if len(pieces) < 2:
        return "", ""
    words = pieces[-1].split()
    cut = len(words)
    while cut and any(ch.isdigit() for ch in words[cut - 1]):
        cut -= 1  # the postal code is the trailing run of words with digits
    start = 0
    if cut == len(words):  # no trailing code: European style puts it first ("28013 Madrid")
        while start < cut and any(ch.isdigit() for ch in words[start]):
            start += 1
    postal = " ".join(words[:start] + words[cut:])
    city_words = [word for word in words[start:cut] if not (word.isupper() and len(word) <= 3)]  # drop "NSW"
    return " ".join(city_words), postal


def street_door(street, unit):
    """What names the door of a US street line and its unit line, to compare: the house number, the
    street name and directional words, and the unit identifiers ("Floor 5", "floor 5" and "FL 5"
    alike; no unit matches only no unit); None without a house number and a street name.

    The street type is left out, and where the directionals stand, because an address service that
    standardises what it stores (Delivery.com, against USPS) may abbreviate or move them: "235 Park
    Ave S" came back as "235 PARK S AVE".
    """
    number, words = [], []
    for token, label in usaddress.parse(street or ""):
        token = _word(token)
        if label == "AddressNumber":
            number.append(token)
        elif label == "StreetName" or label.endswith("Directional"):
            words += [DIRECTIONALS.get(word, word) for word in token.split()]
    unit_ids = tuple(_word(token) for token, label in usaddress.parse(unit or "") if label.endswith("Identifier"))
    if not number or not words:
        return None
    return " ".join(number), frozenset(words), tuple(word for word in unit_ids if word)


def _word(token):
    return " ".join(token.upper().replace("#", " ").strip(" ,.").split())
