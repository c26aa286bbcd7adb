from workers.locate2u.webhook_auth import token_matches, url_token, webhook_url

OLD, NEW = "old-secret-0123456789", "new-secret-0123456789"


def test_token_is_stable_per_secret_and_event_type():
    assert url_token(NEW, "stop.assigned") == url_token(NEW, "stop.assigned")
    assert url_token(NEW, "stop.assigned") != url_token(NEW, "trip.created")
    assert url_token(NEW, "stop.assigned") != url_token(OLD, "stop.assigned")
    assert len(url_token(NEW, "stop.assigned")) == 43


def test_token_for_one_type_does_not_open_another():
    assert not token_matches(url_token(NEW, "stop.assigned"), "trip.created", (NEW,))


def test_rotation_accepts_current_and_previous_only():
    old_token = url_token(OLD, "note.created")
    assert token_matches(old_token, "note.created", (NEW, OLD))
    assert not token_matches(old_token, "note.created", (NEW, None))
    assert not token_matches("", "note.created", (NEW, OLD))


def test_webhook_url_shape():
    url = webhook_url("https://relay.example.com/", NEW, "stop.status-changed")
    assert url == f"https://relay.example.com/webhooks/locate2u/stop.status-changed/{url_token(NEW, 'stop.status-changed')}"
