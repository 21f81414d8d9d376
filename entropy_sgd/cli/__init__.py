"""The launchers' shared flags and entry point: the top layer."""
