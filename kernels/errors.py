"""Errors raised by the kernels package.

    KernelError                  root of everything kernels raise on purpose
    ├── KernelInputError         an argument has the wrong dtype, shape or values (ValueError)
    │   └── KernelDtypeError     an argument has the wrong dtype (also a TypeError)
    └── KernelConfigError        HPCGW_NUMBA_* variables are invalid (ValueError)

Messages name the argument and say how to fix it, because the caller is usually a
notebook user who passed a float16 array or a (n, 1) column by mistake.
"""

from __future__ import annotations


class KernelError(Exception):
    """Root of every error the kernels package raises deliberately."""


class KernelInputError(KernelError, ValueError):
    """An argument has the wrong shape, dtype or values; the message says which and the fix."""


class KernelDtypeError(KernelInputError, TypeError):
    """An argument has a dtype the kernel does not support (catchable as TypeError too)."""


class KernelConfigError(KernelError, ValueError):
    """An HPCGW_NUMBA_* environment variable has a value that cannot be used."""
