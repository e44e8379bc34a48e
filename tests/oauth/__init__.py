"""Tests of the built-in OAuth 2.1 authorization server."""

__all__: list[str] = []
