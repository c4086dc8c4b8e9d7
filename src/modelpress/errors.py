"""Every error modelpress raises on purpose derives from ModelpressError."""
from __future__ import annotations


class ModelpressError(Exception):
    """Base of all modelpress errors."""


class RecipeError(ModelpressError, ValueError):
    """A recipe or stage config is invalid; the message lists every problem found."""


class FormatError(ModelpressError):
    """A .mpz file is damaged, truncated, foreign or otherwise unreadable."""


class NotAModelpressFile(FormatError):
    """The file does not start with the .mpz magic bytes."""


class UnsupportedVersion(FormatError):
    """The file was written by a newer, unknown format version."""


class TruncatedFile(FormatError):
    """The file is shorter (or longer) than its header declares."""


class HeaderTooLarge(FormatError):
    """The declared header size exceeds the cap."""


class InvalidHeader(FormatError):
    """The header passed its checksum but is not a valid header (bad zstd, bad JSON, wrong types)."""


class InvalidOffset(FormatError):
    """A stream's declared offset or length does not fit the file."""


class ChecksumMismatch(FormatError):
    """A stream's or the header's checksum does not match its bytes."""


class CorruptStream(FormatError):
    """A stream passed its checksum but does not decode to what the manifest declares."""


class LimitExceeded(FormatError):
    """The file asks for more memory or layers than the limit allows (see load's max_bytes)."""


class UnsafeArchitecture(FormatError):
    """The stored architecture asks for remote code, the network, or out-of-bounds arguments."""


class ModelMismatch(ModelpressError):
    """The skeleton model given to load() does not match the file."""

