"""Courier notification-service: welcomes users on the channels they chose."""
