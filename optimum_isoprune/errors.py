"""The exceptions users can catch."""


class IsoPruneError(Exception):
    """Base class of optimum-isoprune's errors."""


class UnsupportedModelError(IsoPruneError, TypeError):
    """The model's architecture has no adapter."""


class ModelStateError(IsoPruneError, ValueError):
    """A supported model in a state the pruner cannot start from: no parameters, meta device, not float32."""


class ConfigurationError(IsoPruneError, ValueError, TypeError):
    """A configuration value of the wrong type, out of range, or naming nothing known (a ValueError and a TypeError,
    as the built-in errors it replaces were)."""


class BudgetError(IsoPruneError, ValueError):
    """A MACs / params target that no pruning amount can reach."""


class DataError(IsoPruneError, ValueError):
    """A dataset the model cannot use as given: unreadable files, missing columns, labels that are not its classes."""


class CalibrationDataError(DataError):
    """Calibration data in a form the pruner cannot use."""


class NonFiniteError(IsoPruneError, ValueError):
    """NaN or inf in data, activations, scores, losses or weights; the run stops instead of going on silently."""
