"""The exceptions users can catch."""


class IsoPruneError(Exception):
    """Base class of optimum-isoprune's errors."""


class UnsupportedModelError(IsoPruneError, TypeError):
    """The model's architecture has no adapter."""


class BudgetError(IsoPruneError, ValueError):
    """A MACs / params target that no pruning amount can reach."""


class CalibrationDataError(IsoPruneError, ValueError):
    """Calibration data in a form the pruner cannot use."""


class NonFiniteError(IsoPruneError, ValueError):
    """NaN or inf in data, activations, scores, losses or weights; the run stops instead of going on silently."""
