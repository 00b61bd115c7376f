"""Errors with messages meant for the user; the command line prints them without a traceback."""


class TrainingError(Exception):
  """Base class: something about the inputs or the workdir is wrong; nothing was lost."""


class DataError(TrainingError):
  """Missing, empty or unreadable data."""


class TokenizerError(TrainingError):
  """A tokenizer that cannot be used with this data or model."""


class CheckpointError(TrainingError):
  """A checkpoint that cannot be restored (corrupt or incompatible)."""


class NonFiniteLossError(TrainingError):
  """The loss (or the gradient) became NaN or infinite; training stopped."""
