"""How a request can fail after the engine accepted it (no torch here: engine clients import it)."""


class EngineDeadError(RuntimeError):
    """The engine (thread or core process) is gone; requests in flight and new ones get this error."""


class EngineStepError(RuntimeError):
    """A step failed while this request was in flight; the request was aborted, the engine goes on."""
