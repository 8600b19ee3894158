"""hybridflow: hybrid classifier-generative modeling with normalizing flows."""

__version__ = "0.1.0"

__all__ = ["list_pretrained", "load_pretrained"]


def __getattr__(name: str):
    # Lazy, so that `import hybridflow` stays cheap (no torch import until needed).
    if name in __all__:
        from . import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'hybridflow' has no attribute {name!r}")
