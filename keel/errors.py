"""Exceptions a user can cause. Each carries a message that names the problem."""


class KeelError(Exception):
    """Base class for errors caused by user input or user-supplied files."""


class ModelLoadError(KeelError):
    """A model folder, file or hub id could not be turned into a runnable model."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is readable but its architecture or format is not supported."""


class InvalidRequestError(KeelError, ValueError):
    """A prompt or sampling parameter is invalid; `param` names it where known (an API field name)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class LoRAError(InvalidRequestError):
    """A LoRA adapter cannot be registered, loaded or used (bad folder, unsupported feature, shape)."""


class LoRANotFoundError(LoRAError):
    """A request or call names an adapter that is not registered."""
