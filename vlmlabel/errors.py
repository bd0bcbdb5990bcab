"""Errors the CLI turns into exit code 2 and one line of text.

Library code raises these with a message that says what is wrong and what to do;
only ``cli.py`` decides how they are shown.
"""


class VlmlabelError(Exception):
    """Bad input or an unusable environment: the user can fix it."""


class SourceError(VlmlabelError):
    """The dataset cannot be read the way it was asked to be read."""


class ModelError(VlmlabelError):
    """The model, its weights or its tokenizer cannot be loaded."""


class DeviceError(VlmlabelError):
    """The device or precision asked for is not available."""


class OutputError(VlmlabelError):
    """The rewards cannot be written where they were asked to go."""
