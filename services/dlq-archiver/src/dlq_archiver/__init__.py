"""Courier dlq-archiver: every dead letter kept with its diagnosis, for inspection and replay."""
