"""Exceptions raised by hiermem. Each message says what went wrong and what to do."""


class HiermemError(Exception):
    """Base class: the CLI prints these as one-line errors instead of tracebacks."""


class BackboneError(HiermemError):
    """A backbone could not be found, read or wrapped."""


class ConfigError(HiermemError, ValueError):
    """A configuration value is invalid."""


class CheckpointError(HiermemError):
    """A checkpoint or memory-state file is missing, corrupt or belongs to another model."""


class DataError(HiermemError):
    """A data source is missing, empty or malformed."""


class TrainingError(HiermemError):
    """Training cannot go on (e.g. the loss keeps being non-finite)."""
