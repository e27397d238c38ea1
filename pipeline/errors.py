"""One exception hierarchy: terminal and retriable (transient) errors.

Messages carry paths, keys, counts and line numbers only: never an ID, address or secret.
"""


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""

    exit_code = 1


class ConfigError(PipelineError):
    """Bad configuration or usage: refused before anything is read or written."""

    exit_code = 2


class FatalError(PipelineError):
    """Terminal: retrying will not help (schema violation, permission, bad key)."""


class SchemaError(FatalError):
    """A table does not match its schema in `schemas/`."""


class TransientError(PipelineError):
    """Retriable: network trouble, throttling, a store that is briefly unreachable."""


class StoreUnavailable(TransientError):
    """A store could not be reached or dropped the connection."""


class IncompleteDelivery(TransientError):
    """A delivery is not whole yet (missing split, size/md5 mismatch, truncated gzip)."""


class DeliveryFailed(PipelineError):
    """A delivery was rejected as a whole (e.g. reject threshold crossed); others go on."""


class LockHeld(PipelineError):
    """Another run holds the state lock."""



class Terminated(BaseException):  # noqa: N818 - like KeyboardInterrupt
    """SIGTERM: ends a run like an interrupt (work folder removed, lock released, report
    saved with the reason)."""
