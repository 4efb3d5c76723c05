"""What a run can fail with that the user can act on: every entry point prints it as one
line, without a traceback, and the Ray adapters raise it as itself, not wrapped."""

from gan.core.loop import DivergenceError
from gan.registry.tracking import TrackingError

# DataError, ConfigError and CheckpointError are ValueErrors.
USER_ERRORS = (DivergenceError, TrackingError, ValueError)
