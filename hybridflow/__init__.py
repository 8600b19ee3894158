"""hybridflow: hybrid classifier-generative modeling with normalizing flows."""

__version__ = "0.1.0"
