"""The contract every sink honours, as one abstract test class.

A sink's test module subclasses ``SinkContract`` and provides:
- ``sim`` fixture: a started ``SimulatorServer`` whose app has ``config["STATE"]``
  and ``config["FAULTS"]`` (a FaultPlan);
- ``make_sink(sim, mappings)``: the sink under test pointed at ``sim.url``;
- ``remote(sim, key)``: the records the simulator holds for our key
  (including inactive ones, excluding deleted ones);
- ``remote_name(record)``, ``is_active(record)``;
- ``invalid_location()``: a Location the system refuses permanently.
"""
import pytest

from tests.fixtures import sim_faults
from workers.domain.locations import Location
from workers.resilience.errors import PermanentError, RetriableError
from workers.store.mappings import MappingStore


def sample_location(stop_id=164557, name="Locate2u", status="Pending", version="2022-04-27T04:35:56.114829+00:00",
                    **changes):
    """A canonical location like the one the spec's stop record produces."""
    values = dict(
        key=f"l2u-stop-{stop_id}", version=version, stop_id=stop_id, name=name,
        address="235 Park Ave S, New York, NY 10003, USA", latitude=40.73771, longitude=-73.987949,
        contact_name="Matthew Robinson", contact_phone="212-555-0123", contact_email="matt.robinson@example.com",
        status=status, notes="Please call before you deliver",
        event={"event_type": "stop.status-changed", "keys": {"stopId": stop_id}, "action_date": version,
               "status": status, "payload": {"stopId": stop_id}, "delivery_id": "d-1", "entity": "stop"},
    )
    values.update(changes)
    return Location(**values)


class SinkContract:
    """Shared behaviour tests; see the module docstring for what a subclass provides."""

    @pytest.fixture
    def mappings(self, redis_client):
        return MappingStore(redis_client, "contract")

    @pytest.fixture
    def sink(self, sim, mappings):
        return self.make_sink(sim, mappings)

    def faults(self, sim):
        return sim_faults(sim)

    def test_create(self, sim, sink):
        location = sample_location()
        sink.apply("upsert", location)
        [record] = self.remote(sim, location.key)
        assert self.remote_name(record) == "Locate2u"
        assert self.is_active(record)

    def test_update(self, sim, sink):
        sink.apply("upsert", sample_location())
        sink.apply("upsert", sample_location(name="Locate2u HQ", status="Arrived"))
        [record] = self.remote(sim, sample_location().key)
        assert self.remote_name(record) == "Locate2u HQ"

    def test_idempotent_repeat(self, sim, sink):
        location = sample_location()
        first = sink.apply("upsert", location)
        second = sink.apply("upsert", location)
        assert first == second
        assert len(self.remote(sim, location.key)) == 1

    def test_deactivate(self, sim, sink):
        if not sink.supports_deactivate:
            with pytest.raises(PermanentError):
                sink.apply("deactivate", sample_location(status="Cancelled"))
            return
        sink.apply("upsert", sample_location())
        sink.apply("deactivate", sample_location(status="Cancelled"))
        [record] = self.remote(sim, sample_location().key)
        assert not self.is_active(record)

    def test_delete(self, sim, sink):
        location = sample_location()
        sink.apply("upsert", location)
        sink.apply("delete", location)
        assert [r for r in self.remote(sim, location.key) if self.is_active(r)] == []
        sink.apply("delete", location)  # already gone: still a success

    def test_permanent_error_keeps_status_and_body(self, sim, sink):
        with pytest.raises(PermanentError) as caught:
            sink.apply("upsert", self.invalid_location())
        assert caught.value.status is not None and 400 <= caught.value.status < 500
        assert caught.value.body

    def test_retriable_errors(self, sim, sink):
        self.faults(sim).inject(503)
        with pytest.raises(RetriableError) as unavailable:
            sink.apply("upsert", sample_location())
        assert unavailable.value.status == 503
        self.faults(sim).inject(429, retry_after=7)
        with pytest.raises(RetriableError) as limited:
            sink.apply("upsert", sample_location())
        assert limited.value.status == 429 and limited.value.retry_after == 7
        sink.apply("upsert", sample_location())
        assert len(self.remote(sim, sample_location().key)) == 1

    def test_a_write_answered_by_a_page_not_the_apis_is_retried_and_not_doubled(self, sim, sink):
        """The write took effect, then a proxy in front of the API answered 200 with its own HTML
        page. Reading the answer raised a JSONDecodeError, taken for a bug of ours: the delivery was
        dead-lettered at once as an "internal error" (and Delivery.com's retry added the address a
        second time). Now the sink either needs nothing from the answer (success) or raises a
        retriable error naming the answer, and the retry, a moment later, leaves one record with the
        retried data, not two."""
        location = sample_location()
        self.faults(sim).fail_after_apply("garbled")
        try:
            sink.apply("upsert", location)
        except RetriableError as unreadable:
            assert "answered 200 with a body" in unreadable.message and "<html>" in unreadable.body
        assert self.faults(sim).counts["applied then garbled"] == 1
        sink.apply("upsert", sample_location(name="Retried"))
        assert [self.remote_name(record) for record in self.remote(sim, location.key)] == ["Retried"]
