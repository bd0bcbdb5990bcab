"""Errors the CLI turns into exit code 2 and one line of text.

Library code raises these with a message that says what is wrong and what to do;
only ``cli.py`` decides how they are shown.
"""


class VlmlabelError(Exception):
    """Bad input or an unusable environment: the user can fix it."""


class SourceError(VlmlabelError):
    """The dataset cannot be read the way it was asked to be read."""


MULTI_CAMERA = "choose one with --image-key, or score several with --image-key A --image-key B"


class SeveralCameras(SourceError):
    """The dataset has several image streams and none was named; ``cameras`` lists them."""

    def __init__(self, message: str, cameras: list[str]):
        super().__init__(message)
        self.cameras = cameras


class WorkerLost(SourceError):
    """A decoding worker died (the out-of-memory killer, a signal): nothing is wrong with the data or the progress
    saved, which a rerun takes up."""


class ModelError(VlmlabelError):
    """The model, its weights or its tokenizer cannot be loaded."""


class DeviceError(VlmlabelError):
    """The device or precision asked for is not available."""


class OutputError(VlmlabelError):
    """The rewards cannot be written where they were asked to go."""


class LockedError(OutputError):
    """Another run is writing the same destination right now."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a run (``files.interrupt``); the CLI exits with 128 + the signal number. A
    KeyboardInterrupt, so both signals take Ctrl-C's path: no ``except Exception`` catches it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    def __reduce__(self) -> tuple[type, tuple[int, str]]:
        # copied and pickled whole: an exception raised inside h5py's file driver is re-raised as a copy
        return type(self), (self.signum, str(self))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
