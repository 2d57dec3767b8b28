"""The local backend (this machine)."""

from gateway.backends.local.backend import LocalBackend

__all__ = ["LocalBackend"]
