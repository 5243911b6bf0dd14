"""The agent's work beside the API: the node it serves, the loops that publish and decide, the revision feed."""
