"""The one exception type for bad user input.

Entry points catch `UserError`, print its message as a single line and exit with code 2,
so every check in the library can raise instead of printing or calling `sys.exit`.
"""
from __future__ import annotations


class UserError(Exception):
    """Input the user can fix: a missing file, a bad config value, a malformed record."""
