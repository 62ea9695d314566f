"""subsys: live data from databases that cannot push changes."""

__version__ = "0.2.0"
__all__ = ["__version__"]
