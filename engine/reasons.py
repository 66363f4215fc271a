"""Reason codes of rows that are not predictions, and the error that carries them.

Both decoders (``engine.decode``, ``engine.dicom``), the walk and the driver name failures
with these codes; they are stable (documented in the README) so that a hospital's scripts
can count them across runs and versions.
"""

from __future__ import annotations

import stat
from enum import StrEnum

class Reason(StrEnum):
    """Why a row is not a prediction (the ``reason`` column). Members equal their strings."""

    EMPTY = "empty"
    TRUNCATED = "truncated"
    CORRUPT = "corrupt"
    TOO_LARGE = "too_large"
    UNSUPPORTED_PIXELS = "unsupported_pixels"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    NOT_AN_IMAGE = "not_an_image"
    NOT_CT_IMAGE = "not_ct_image"
    LOCALIZER = "localizer"
    UNREADABLE = "unreadable"
    MULTI_FRAME = "multi_frame"
    TIMEOUT = "timeout"  # a decoder ran past its per-file time budget (engine.sandbox)
    NOT_A_REGULAR_FILE = "not_a_regular_file"  # FIFO, socket, device, folder link: never opened for reading
    INTERNAL = "internal"  # a worker died or a row could not be written: retried by the next run


# the codes by name, as the decoders import them
EMPTY, TRUNCATED, CORRUPT, TOO_LARGE = Reason.EMPTY, Reason.TRUNCATED, Reason.CORRUPT, Reason.TOO_LARGE
UNSUPPORTED_PIXELS, UNSUPPORTED_TRANSFER_SYNTAX = Reason.UNSUPPORTED_PIXELS, Reason.UNSUPPORTED_TRANSFER_SYNTAX
NOT_AN_IMAGE, NOT_CT_IMAGE, LOCALIZER = Reason.NOT_AN_IMAGE, Reason.NOT_CT_IMAGE, Reason.LOCALIZER
UNREADABLE, MULTI_FRAME, TIMEOUT = Reason.UNREADABLE, Reason.MULTI_FRAME, Reason.TIMEOUT
NOT_A_REGULAR_FILE, INTERNAL = Reason.NOT_A_REGULAR_FILE, Reason.INTERNAL

#: Not images at all, or not CT slices: skipped rows, not errors.
SKIP_CODES = frozenset({NOT_AN_IMAGE, NOT_CT_IMAGE, LOCALIZER, NOT_A_REGULAR_FILE})
#: Rows that a rerun tries again (the cause may have gone: permissions, a link's target, a
#: worker that died): never counted as done.
RETRY_CODES = frozenset({INTERNAL, UNREADABLE})


class DecodeError(Exception):
    """A file that could not be turned into a model input; ``code`` is a stable reason."""

    def __init__(self, code: Reason, message: str, redact: list[str] | None = None):
        super().__init__(message)
        self.code = Reason(code)
        self.message = message
        self.redact = redact or []  # identifying values of the file: never written anywhere

    @property
    def skipped(self) -> bool:
        return self.code in SKIP_CODES


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words (for its row's message)."""
    for test, name in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISDIR, "folder")):
        if test(mode):
            return name
    return "special file"
