"""The agent daemon: probes, publishes observations, decides on the leader, serves HTTP."""
