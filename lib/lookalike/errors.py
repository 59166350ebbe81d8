"""Why a file could not be catalogued: the codes of ingest_errors.error, and one-line messages.

Every stage that records a bad file uses these codes; the README lists them. A file recorded
with a code is not read again while its size and mtime stay the same (`--retry-errors` forces
it), except for the codes in RETRIED, which describe the machine rather than the file.
"""

from __future__ import annotations

from enum import StrEnum


class IngestError(StrEnum):
    # scan: found bad without opening it
    BAD_NAME = "bad_name"            # the file name is not valid UTF-8
    BROKEN_LINK = "broken_link"      # a symlink to nothing (or a loop)
    OUTSIDE_ROOT = "outside_root"    # a symlink leading out of the image roots
    NOT_A_FILE = "not_a_file"        # a FIFO, device or socket named like an image
    UNREADABLE = "unreadable"        # permission denied, or a failed read
    # extract: read once, decoded at reduced scale
    VANISHED = "vanished"            # gone between the scan and the extract
    EMPTY = "empty"                  # 0 bytes
    NOT_AN_IMAGE = "not_an_image"    # no known image format
    DECODE = "decode"                # a known format, but broken (truncated, corrupt)
    RAW_DECODE = "raw_decode"        # a camera RAW whose preview and demosaic both failed
    HEIF_DECODE = "heif_decode"      # a HEIC/HEIF/AVIF file no decoder could read
    TOO_LARGE = "too_large"          # over the decompression-bomb guard, or out of memory
    THUMBNAIL = "thumbnail"          # the thumbnail could not be written (the disk, not the file)
    STORE = "store"                  # the original could not be filed into the store (the disk)
    CHANGED = "changed"              # replaced or rewritten while it was being read
    # embed: from the thumbnail
    EMBED = "embed"                  # the thumbnail is gone and the original cannot replace it


# Codes that describe the machine (a full or read-only disk), not the file: always retried.
RETRIED = frozenset({IngestError.THUMBNAIL, IngestError.STORE})


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """The first line of a message, spaces folded, at most `limit` characters: what a catalog row
    or a terminal shows (a server's DETAIL and HINT lines, a traceback's frames, stay out)."""
    arg = error.args[0] if isinstance(error, BaseException) and len(error.args) == 1 else None
    # LibRaw's messages arrive as bytes: str() would show b'...'
    lines = [" ".join(line.split()) for line in
             (arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(error)).splitlines()]
    text = next((line for line in lines if line), "")
    if not text and isinstance(error, BaseException):
        text = type(error).__name__
    return text[:limit]
