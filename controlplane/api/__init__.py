"""The HTTP API every agent serves."""
