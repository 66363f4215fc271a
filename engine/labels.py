"""Class folders of a labelled data set: which is positive, recognised by name and never by
sort order. covidct-train and covidct-evaluate read labelled folders by this one rule."""

from __future__ import annotations

import re
from pathlib import Path

#: Folder names read as the positive class unless --positive says otherwise.
POSITIVE_WORDS = re.compile(r"^(infected|covid(-?19)?|positive|pos|sars-?cov-?2|abnormal|disease|yes|1)$", re.I)
NEGATIVE_PREFIX = re.compile(r"^(not|non|no|un)[-_ ]?", re.I)


class DataError(ValueError):
    """A labelled data folder cannot be used; the message says how to fix it."""


def resolve_classes(data_dir: Path, positive: str | None = None) -> tuple[str, str]:
    """(negative, positive) class folder names of ``data_dir``.

    The positive class is named by ``positive`` or recognised from its name (Infected,
    COVID, positive...); it is never taken from sort order.
    """
    folders = sorted(p.name for p in Path(data_dir).iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) != 2:
        raise DataError(f"{data_dir} must hold exactly two class folders, found {len(folders)}: {folders}")
    if positive is not None:
        if positive not in folders:
            raise DataError(f"--positive {positive!r} is not one of the class folders {folders}")
        pos = positive
    else:
        hits = [f for f in folders if POSITIVE_WORDS.match(f)
                or (POSITIVE_WORDS.match(NEGATIVE_PREFIX.sub("", f)) and not NEGATIVE_PREFIX.match(f))]
        if len(hits) != 1:
            raise DataError(f"cannot tell which class is positive among {folders}: "
                            f"name it with --positive, e.g. --positive {folders[0]!r}")
        pos = hits[0]
    neg = next(f for f in folders if f != pos)
    return neg, pos
