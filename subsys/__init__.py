"""subsys: live data from databases that cannot push changes."""

__version__ = "0.1.0"
__all__ = ["__version__"]
