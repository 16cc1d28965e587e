"""The one error type of the converter: raised for bad checkpoints / configs with a message that names the
file, the tensor and what to do."""


class ConversionError(ValueError):
    """A checkpoint or config can't be converted. The message names the tensor (and file) and the fix."""
