"""metaf2n: MetaF2N blind super-resolution with a fast self-similarity loss."""

__version__ = "0.1.0"
