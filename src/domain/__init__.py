"""Pure domain model: aggregates, their events and the rules they enforce.

Imports only the standard library and ``eventsourcing.domain`` (checked by import-linter).
"""
