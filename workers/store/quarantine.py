"""The quarantine: deliveries that passed authentication but not validation, newest first."""
import json
import time

from workers.store import keys

QUARANTINE_LIMIT = 1000

class Quarantine:
    """Deliveries that passed authentication but not validation, kept for inspection."""

    KEY = keys.QUARANTINE

    def __init__(self, client, limit=QUARANTINE_LIMIT):
        self.redis = client
        self.limit = limit  # the newest this many are kept

    def add(self, event_type, body, reason, errors=None, delivery_id=None):
        item = {"event_type": event_type, "body": body, "reason": reason, "errors": errors,
                "delivery_id": delivery_id, "received_at": time.time()}
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.lpush(self.KEY, json.dumps(item))
            pipe.ltrim(self.KEY, 0, self.limit - 1)
            pipe.execute()

    def items(self, limit=100):
        """The newest quarantined deliveries first."""
        return [json.loads(raw) for raw in self.redis.lrange(self.KEY, 0, limit - 1)]
