"""User-facing errors: one paragraph that says what was wrong, where, and what to do."""


class ReciPruneError(Exception):
    """An error caused by the user's input (recipe, data, model path, flag).

    The CLI prints its message without a traceback and exits with status 2.
    """


class RecipeError(ReciPruneError):
    """A recipe that cannot be parsed or validated; raised before any weights load."""


class DataError(ReciPruneError):
    """Calibration or evaluation data that cannot be read or used."""


class ModelLoadError(ReciPruneError):
    """A model path or id that cannot be loaded."""
