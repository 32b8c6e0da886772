"""Command messages and their handlers (the eventsourcing Application), plus ports to the outside."""
