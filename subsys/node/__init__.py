"""The node runtime: topic streams, pollers, the reconcile decision and its executor."""
