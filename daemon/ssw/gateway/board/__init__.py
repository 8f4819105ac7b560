"""The live status page: a read-only view for operators, updated over server-sent events."""
