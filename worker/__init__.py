"""clientsync: keep client records in sync across invoicing providers, exactly once in effect."""

__version__ = "0.1.0"
