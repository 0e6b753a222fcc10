"""fedsqueeze: federated compressed training on Flower."""

__version__ = "0.1.0"
