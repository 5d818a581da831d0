"""textkit: small helpers for working with text."""
