"""The worker's delivery path, in the order a delivery passes through it.

1. ``process`` (task ``process_delivery``): take the processing lease, validate
   the recorded body, then fan out, or resume a fan-out that stalled.
2. ``fan_out``: plan once (routes, the stop fetched from Locate2u, one record
   per sink), then mark every sink pending and queue one ``DeliverJob`` each, so
   a failing sink never delays or repeats the others.
3. ``deliver`` (task ``deliver``): one job to one sink under its breaker, rate
   limit, key lock and version check; applied, stale, waiting, retrying or
   dead-lettered.
4. ``outcomes``: every outcome recorded by one call (ledger, trace, metrics,
   log); dead letters.
5. ``sweeper`` (task ``sweep_received``): finds what stopped moving and
   queues it again; ``replay`` sends dead letters again.

``jobs`` holds the ``deliver`` job record; ``failures`` tells an outage from a bug.
"""
