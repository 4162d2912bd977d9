"""resilient's chaos harness: run a real training job, break it the way production breaks, report.

Layout: ``scenario`` (schema), ``triggers`` (when faults are due), ``faults/`` (one module per action
family), ``topology`` (etcd + hosts), ``netns``/``proxy`` (network faults), ``inworker`` (faults a
worker causes itself), ``eventlog``/``metrics``/``invariants`` (pure analysis of the event history),
``calibrate`` (bounds from a fault-free run), ``runner``/``suite``/``cli`` (orchestration), ``report``,
``progress``, ``teardown``, ``preflight``.
"""
