"""The one documented exception type of the package.

Every error a user can act on (bad arguments, a broken model folder, a profile that does not fit, out of memory at
every preset, ...) is a `StepVideoError` subclass whose message is one line naming the problem and the fix; the CLI
prints it after "error: ", the Python API raises it as is.
"""
from __future__ import annotations


class StepVideoError(Exception):
    """Base of every one-line error of lowvram_stepvideo."""


class UsageError(StepVideoError):
    """A request that cannot run as given (empty prompt, bad number, unwritable output, ...)."""


class ConfigError(StepVideoError, ValueError):
    """A config or profile file is missing, unreadable or does not describe what is expected."""
