"""Offline work on logged decisions: reading logs, candidate policies, `streamagent evaluate`."""
