"""autoenroll: a user's second certificate, obtained automatically with the first."""

__version__ = "0.1.0"
