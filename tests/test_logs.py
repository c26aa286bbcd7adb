import io
import json
import logging

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
