"""The durable store (SQLite by default)."""

from gateway.store.records import Event, JobRecord
from gateway.store.sqlite import Change, Store

__all__ = ["Change", "Event", "JobRecord", "Store"]
