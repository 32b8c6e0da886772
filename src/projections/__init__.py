"""Read models: one module per read model (its Projection, view interface, SQLite and PostgreSQL
views), the shared SQL view machinery (``sqlview``) and the rebuild/supervision logic (``runtime``).

Imports only the standard library, eventsourcing, psycopg and ``domain``.
"""
