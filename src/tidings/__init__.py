"""Tidings: a self-hosted real-time server speaking the Supabase Realtime protocol, and its SDK."""

__all__ = ["__version__"]

__version__ = "0.1.0"
