"""Deliveries by stop: an index of the ledger by ``stopId`` and ``stopRef``, brought up to date on read.

The ledger indexes deliveries by receipt time only (``l2u:ledger:all``). Before a
search, the reader calls ``refresh()``: it reads the bodies of the deliveries
recorded since the last refresh and adds each to one sorted set per stop id and
per stop reference, scored by receipt time and expiring with the ledger. Nothing
on the accept path writes it, so receiving a webhook costs nothing more.
"""
import json

from workers.store import keys
from workers.store.ledger import LEDGER_RETENTION, Ledger

WATERMARK = keys.STOP_INDEX_WATERMARK
OVERLAP_SECONDS = 30  # receipts on other web processes may land slightly out of time order
BATCH = 500


class StopIndex:
    """Ledger delivery ids by stop id and by stop reference."""

    def __init__(self, client):
        self.redis = client

    @staticmethod
    def key(kind, value):
        return f"{keys.STOP_INDEX}{kind}:{value}"

    def refresh(self, page=20000):
        """Index every delivery recorded since the last refresh, ``page`` at a time; return how many were
        read. All of them: a search answered from part of them would show a stop without its deliveries."""
        since = float(self.redis.get(WATERMARK) or 0)
        lowest, read, newest = max(0.0, since - OVERLAP_SECONDS), 0, since
        while True:
            found = self.redis.zrangebyscore(Ledger.ALL, lowest, "+inf", start=read, num=page, withscores=True)
            self._index(found)
            read += len(found)
            if found:
                newest = max(newest, found[-1][1])
            if len(found) < page:
                break
        if read:
            self.redis.set(WATERMARK, repr(newest))
        return read

    def _index(self, found):
        """Add each of ``found`` (``(delivery id, receipt time)``) under its stop id and reference."""
        for start in range(0, len(found), BATCH):
            chunk = found[start:start + BATCH]
            with self.redis.pipeline(transaction=False) as pipe:
                for delivery_id, _ in chunk:
                    pipe.hget(Ledger.key(delivery_id), "body")
                bodies = pipe.execute()
            with self.redis.pipeline(transaction=False) as pipe:
                for (delivery_id, received_at), body in zip(chunk, bodies):
                    for kind, value in stop_keys(body).items():
                        pipe.zadd(self.key(kind, value), {delivery_id: received_at})
                        pipe.expire(self.key(kind, value), LEDGER_RETENTION)
                pipe.execute()

    def deliveries(self, stop):
        """Ids of the deliveries whose ``stopId`` or ``stopRef`` is ``stop``, newest first."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrevrange(self.key("id", stop), 0, -1, withscores=True)
            pipe.zrevrange(self.key("ref", stop), 0, -1, withscores=True)
            by_id, by_ref = pipe.execute()
        scores = dict(by_id + by_ref)
        return sorted(scores, key=scores.get, reverse=True)


def stop_keys(body):
    """``{"id": stopId, "ref": stopRef}`` (those present) of a raw delivery body."""
    try:
        data = json.loads(body or "{}")
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    keys = {"id": data.get("stopId"), "ref": data.get("stopRef")}
    return {kind: str(value) for kind, value in keys.items() if value not in (None, "")}
