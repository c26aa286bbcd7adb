import io
import json
import logging

import pytest

from workers.logs import RedactingFilter, bound_context, json_handler


def capture(secrets=()):
    handler = json_handler(secrets)
    stream = io.StringIO()
    handler.setStream(stream)
    logger = logging.getLogger("test.logs")
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_lines_are_json_with_the_delivery_context():
    logger, stream = capture()
    with bound_context(delivery_id="d-1", sink="b2b", event_type="stop.assigned"):
        logger.info("applied %s", "upsert")
    logger.info("outside")
    inside, outside = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert inside["message"] == "applied upsert" and inside["level"] == "INFO"
    assert (inside["delivery_id"], inside["sink"], inside["event_type"]) == ("d-1", "b2b", "stop.assigned")
    assert "delivery_id" not in outside


def test_secrets_tokens_and_credentials_are_redacted_even_in_tracebacks():
    logger, stream = capture(secrets=["hunter2-very-secret"])
    logger.info("POST /webhooks/locate2u/stop.assigned/AbCdEf-123 Authorization: Bearer eyJhbGci.x.y")
    logger.info("callback?code=c0de&state=s7a7e and {'access_token': 'tok-123'} and hunter2-very-secret")
    try:
        raise ValueError("boom with hunter2-very-secret")
    except ValueError:
        logger.exception("failed")
    text = stream.getvalue()
    for leaked in ("AbCdEf-123", "eyJhbGci", "c0de", "s7a7e", "tok-123", "hunter2-very-secret"):
        assert leaked not in text
    assert text.count("[redacted]") >= 7
    assert all(json.loads(line) for line in text.splitlines())


def test_ordinary_fields_are_left_alone():
    assert RedactingFilter().scrub('{"code": "bad_loc"} status code: 404') == '{"code": "bad_loc"} status code: 404'


@pytest.mark.parametrize("line, leaked", [
    ("GET /webhooks/locate2u/stop.assigned/SeCrEt-T0k3n HTTP/1.1", "SeCrEt-T0k3n"),
    ("AUTHORIZATION: opaque-cr3dential", "opaque-cr3dential"),
    ("header BEARER b3arer-tok", "b3arer-tok"),
    ("header BaSiC dXNlcjpwYXNz", "dXNlcjpwYXNz"),
    ("https://x/callback?LINK=l1nk-value", "l1nk-value"),
    ("https://x/callback?x=1&State=st4te-value", "st4te-value"),
    ("https://x/callback?CODE=c0de-value", "c0de-value"),
    ("form ...&Code_Verifier=v3rifier-value", "v3rifier-value"),
    ("REFRESH_TOKEN = 'r3fresh-value'", "r3fresh-value"),
    ("{'Client_Secret': 'cl1ent-value'}", "cl1ent-value"),
    ("Password=pa55word-value", "pa55word-value"),
    ("Jürgen's header Bearer n0n-ascii-line", "n0n-ascii-line"),
    # Unicode case folding, as the patterns' (?i) does it: ſ (long s) matches s, K (Kelvin) matches k
    ("form paſſword=l0ng-s-value", "l0ng-s-value"),
    ("https://x/callback?ſtate=ſt4te-value", "t4te-value"),
    ("ACCESS_TO\u212aEN=kelv1n-value", "kelv1n-value"),
])
def test_every_credential_pattern_is_redacted_whatever_its_case(line, leaked):
    """A pattern runs only on text holding one of its cues: each pattern, in odd case, still applies."""
    scrubbed = RedactingFilter().scrub(line)
    assert leaked not in scrubbed and "[redacted]" in scrubbed
