"""Pure authentication: JWT verification into a :class:`~tidings.auth.tokens.Principal`."""

from .tokens import AuthError, Principal, Verifier

__all__ = ["AuthError", "Principal", "Verifier"]
