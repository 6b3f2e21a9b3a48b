"""Courier common library: the messaging spine shared by every service."""
