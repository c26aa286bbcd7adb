"""The workers' Redis-held latency histogram: what ``/metrics`` shows, and what one observation costs."""
from prometheus_client.core import HistogramMetricFamily

from workers.metrics import LATENCY, LATENCY_BUCKETS, RedisMetricsCollector, WorkerMetrics


def histogram(client, sink="storepoint"):
    """``({le: cumulative count}, sum)`` of ``sink``'s receipt-to-applied histogram, as collected."""
    family = next(family for family in RedisMetricsCollector(client, [sink]).collect()
                  if isinstance(family, HistogramMetricFamily))
    buckets = {sample.labels["le"]: sample.value for sample in family.samples if sample.name.endswith("_bucket")}
    total = next(sample.value for sample in family.samples if sample.name.endswith("_sum"))
    return buckets, total


def commands_run(client):
    """Commands Redis ran since its stats were reset, but for the reset itself."""
    return sum(stats["calls"] for name, stats in client.info("commandstats").items()
               if not name.startswith("cmdstat_config"))


def test_each_observation_counts_in_every_bucket_it_fits_and_costs_four_commands(redis_client):
    """One bucket field per observation, cumulated when collected: an applied write in steady state
    (tens of ms) fell in all twelve buckets and cost fifteen commands."""
    metrics = WorkerMetrics(redis_client)
    redis_client.config_resetstat()
    for latency in (0.01, 0.05, 0.07, 4.0, 7200.0):
        metrics.delivery("storepoint", "applied", latency)
    assert commands_run(redis_client) == 5 * 4 - 1  # the counter, one bucket (none past the last), count, sum
    buckets, total = histogram(redis_client)
    fits = {repr(bound): sum(latency <= bound for latency in (0.01, 0.05, 0.07, 4.0, 7200.0))
            for bound in LATENCY_BUCKETS}
    assert buckets == {**{le: float(count) for le, count in fits.items()}, "+Inf": 5.0}
    assert buckets["0.05"] == 2 and buckets["5.0"] == 4 and buckets["3600.0"] == 4
    assert round(total, 2) == 7204.13


def test_counts_kept_cumulatively_by_an_earlier_version_still_count(redis_client):
    """An upgraded relay keeps the histogram going: the cumulative fields written before go on counting."""
    earlier = {repr(bound): 1 if bound >= 1.0 else 0 for bound in LATENCY_BUCKETS}  # one observation of 0.8 s
    redis_client.hset(LATENCY + "storepoint", mapping={**earlier, "count": 1, "sum": 0.8})
    WorkerMetrics(redis_client).delivery("storepoint", "applied", 0.2)
    buckets, total = histogram(redis_client)
    assert buckets["0.1"] == 0 and buckets["0.25"] == 1 and buckets["0.5"] == 1
    assert buckets["1.0"] == 2 and buckets["3600.0"] == 2 and buckets["+Inf"] == 2
    assert round(total, 2) == 1.0
