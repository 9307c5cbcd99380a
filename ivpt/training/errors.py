"""The exception of the training workflow."""


class TrainingError(ValueError):
    """A training command that cannot run as given: the message names the file, recipe key, flag or value at fault.

    Raised by `ivpt.training.main` / `ivpt.training.train` before anything is written; the console entry points
    (`ivpt-train`, `train_ivpt.py`) print it and exit with status 2."""


class MissingPathError(TrainingError, FileNotFoundError):
    """A file or directory named by a flag does not exist."""


__all__ = ["MissingPathError", "TrainingError"]
