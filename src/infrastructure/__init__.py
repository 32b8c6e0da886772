"""Adapters: settings, persistence wiring, secrets vault and keyring, outbound HTTP."""
