"""The test bed's two errors: one for "cannot run here", one for "a command failed".

Example::

    >>> issubclass(TestbedUnavailable, TestbedError)
    True
"""

from __future__ import annotations


class TestbedError(RuntimeError):
    """A test bed operation failed (a command exited non-zero, an unknown host, ...)."""

    __test__ = False  # not a pytest test class, whatever its name


class TestbedUnavailable(TestbedError):
    """The test bed cannot run on this machine: not root, or a kernel feature or tool is missing."""

    __test__ = False
