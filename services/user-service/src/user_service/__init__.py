"""Courier user-service: registers users and emits their events through an outbox."""
