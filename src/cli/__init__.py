"""The ``integrations`` command: serve, projections, events, keys, principals. The composition root."""
