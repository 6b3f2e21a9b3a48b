"""The archiver's HTTP API."""
