"""User-facing errors: each carries a message fit to print as one line."""


class EmberError(Exception):
    """Base for every error ember reports to a user (CLI one-liner, HTTP 4xx)."""


class ModelLoadError(EmberError):
    """A model's files are missing, malformed or unsupported."""


class GGUFError(ModelLoadError):
    """A GGUF file is malformed, hostile or uses something ember does not support."""


class ProtectedModel(EmberError):
    """A name that belongs to a model ember ships or serves: it cannot be copied onto or removed."""


class TokenizerError(EmberError):
    """A tokenizer could not be built or used."""


class ChatTemplateError(EmberError):
    """A chat template failed to compile or raised while rendering."""


class InvalidParameter(EmberError, ValueError):
    """A request parameter is out of range or of the wrong type; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class OutOfResources(EmberError):
    """The KV cache or queue cannot take the request."""


class LoraError(EmberError):
    """A LoRA adapter's files are missing, malformed, or do not fit the base model (or its name is taken)."""


class LoraNotFound(EmberError):
    """No LoRA adapter of that name is loaded."""


class LoraInUse(EmberError):
    """The LoRA adapter still serves running or waiting requests."""
