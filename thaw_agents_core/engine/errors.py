"""The engine layer's error."""


class EngineError(RuntimeError):
    """The engine could not start, or died while serving."""
