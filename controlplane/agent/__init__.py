"""The agent's work beside its API: the node, the loops that publish and decide, the feed."""
