"""What keeps patients out of every output: pseudonyms (``--pseudonymize``) and redaction of a DICOM file's
own identifying values from the strings written about it (its path, its error message).

Redaction reads every identifying attribute that can be read, at any depth of the dataset (inside
sequences too), one attribute at a time so that a malformed one never disables the others. It finds
each value however a file system may hold it: any case; any of ``^ _ . , - /`` or space between its
parts; each part alone; a date as YYYYMMDD, YYYY-MM-DD or DD.MM.YYYY, with or without a time after
it; an identifier followed or preceded by more letters or digits; accented letters composed (NFC),
decomposed (NFD), stripped of their accents, or as the Latin-1/CP1252 bytes of a folder written by
an older system (which Python shows as surrogate escapes). Its cost is bounded: words are looked up
in a set, and only a bounded number of patterns goes into one regular expression; past the bounds
the whole string is redacted (fail closed).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
import unicodedata

REDACTED = "[redacted]"

#: Header attributes whose values identify a patient, a person or a site (DICOM PS3.15 Annex E, those a
#: path or a message could carry), read at any depth of the dataset.
IDENTIFYING = (
    # the patient
    "PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "PatientID", "OtherPatientIDs",
    "IssuerOfPatientID", "PatientBirthDate", "PatientAddress", "PatientTelephoneNumbers", "MedicalRecordLocator",
    "AdmissionID", "ResponsiblePerson",
    # the visit and the request
    "AccessionNumber", "StudyID", "RequestedProcedureID", "ScheduledProcedureStepID", "PerformedProcedureStepID",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "AcquisitionDateTime",
    # people and places
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord", "RequestingPhysician", "ScheduledPerformingPhysicianName",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
)
#: Identifiers (not names, not dates): found with more letters or digits after them, and before them once
#: long enough (a file named PID12345b.dcm, a folder x1234567). Marked in the value list with ID_MARK.
ID_ATTRIBUTES = frozenset({"PatientID", "OtherPatientIDs", "MedicalRecordLocator", "AdmissionID", "AccessionNumber",
                           "RequestedProcedureID", "ScheduledProcedureStepID", "PerformedProcedureStepID"})
ID_MARK = "\x1fid:"
#: Bounds on the work one file's values may cost (an 800 KB PatientName of short parts is one file).
MAX_ELEMENTS = 200_000  # elements visited, all depths together
MAX_DEPTH = 8  # sequence nesting
MAX_PATTERNS = 512  # alternatives in the one regular expression; more and the whole string is redacted
MAX_JOINED_TOKENS = 16  # a value of more parts is matched part by part
MAX_SUBSTRING_IDS = 64  # identifiers also found inside longer words (the first ones)

_SPLIT = re.compile(r"[\^\s_.,\-/\\=]+")
_SEP = r"[\^\s_.,\-/]*"
_WORD = re.compile(r"[a-z0-9]+")
_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})(\d{2,6}(?:\.\d+)?)?(?:[+-]\d{4})?")
#: a time after a date in a path: T1430, _143022, -14.30.22 ...
_TIME = r"(?:[t_\- .]?\d{2}(?:[:\-.]?\d{2}){0,2}(?:\.\d+)?)?"


# -- reading the values ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _tags() -> dict[int, bool]:
    """Tag number -> whether its values are identifiers."""
    from pydicom.datadict import tag_for_keyword

    return {t: k in ID_ATTRIBUTES for k in IDENTIFYING if (t := tag_for_keyword(k)) is not None}


def _raw_texts(elem) -> list[str]:
    """The values of a not yet converted element as its raw bytes say them (whatever its VR claims)."""
    raw = getattr(elem, "value", None)
    if not isinstance(raw, (bytes, bytearray)):
        return []
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        text = bytes(raw).decode("latin-1")
    return text.replace("\x00", " ").split("\\")


def identifying_values(ds) -> list[str]:
    """Every value of the IDENTIFYING attributes of a pydicom dataset, at any depth (longest first);
    identifiers carry ID_MARK in front.

    Never raises: an attribute that cannot be converted is read from its raw bytes, one that cannot be
    read at all is skipped, and the others are still read."""
    tags = _tags()
    out: set[str] = set()
    budget = [MAX_ELEMENTS]

    def walk(d, depth: int) -> None:
        # Only identifying elements and possible sequences need a look; the others only count against the
        # budget, in the same order (a look per element cost about 1 us: 0.28 ms for a CT slice's 253).
        deeper = depth < MAX_DEPTH
        try:
            elems = list(d.items())
            look = [i for i, (tag, raw) in enumerate(elems)
                    if tag in tags or (deeper and getattr(raw, "VR", None) in _SEQUENCE_OR_UNKNOWN)]
        except Exception:  # noqa: BLE001
            return
        seen = 0
        for i in look:
            budget[0] -= i + 1 - seen
            seen = i + 1
            if budget[0] < 0:
                return
            tag = elems[i][0]
            try:
                raw = d.get_item(tag)
            except Exception:  # noqa: BLE001
                continue
            if int(tag) in tags:
                # the raw bytes always (a wrong VR reads a name as numbers), the converted value where it converts
                texts = _raw_texts(raw)
                try:
                    v = d[tag].value
                    items = list(v) if isinstance(v, (list, tuple)) or getattr(v, "VM", 1) > 1 else [v]
                    texts += [str(x) for x in items]
                except Exception:  # noqa: BLE001  a wrong VR or bad characters: the raw bytes still name them
                    pass
                mark = ID_MARK if tags[int(tag)] else ""
                out.update(mark + s.strip() for s in texts if s and s.strip())
            elif depth < MAX_DEPTH and _is_sequence(raw, tag):
                try:
                    seq = d[tag].value
                except Exception:  # noqa: BLE001  an unreadable sequence: what it holds cannot be read
                    continue
                for item in seq:
                    walk(item, depth + 1)
        budget[0] -= len(elems) - seen

    walk(ds, 0)
    return sorted(out, key=len, reverse=True)


#: The VRs of an element, as the dataset holds it, that may be a sequence (:func:`_is_sequence` decides): SQ,
#: or none said (implicit VR). A deferred element's VR is the one its header says, as when it is read.
_SEQUENCE_OR_UNKNOWN = (None, "SQ")


def _is_sequence(raw, tag) -> bool:
    vr = getattr(raw, "VR", None)
    if vr is None and not tag.is_private:
        from pydicom.datadict import dictionary_VR

        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return False
    return vr == "SQ"


# -- finding them in text ----------------------------------------------------------------------------------


def _fold(c: str) -> str:
    """One character in the form matched: a surrogate escape as its Latin-1/CP1252 letter, accents
    dropped (NFKD without combining marks), case folded."""
    if "\udc80" <= c <= "\udcff":
        b = bytes([ord(c) - 0xDC00])
        try:
            c = b.decode("cp1252")
        except UnicodeDecodeError:
            c = b.decode("latin-1")
    if c.isascii():
        return c.lower()
    return "".join(x for x in unicodedata.normalize("NFKD", c) if not unicodedata.combining(x)).casefold()


def _canon(text: str) -> tuple[str, list[int] | None]:
    """``text`` folded, with the index in ``text`` of each folded character (None: the same indices)."""
    if text.isascii():
        return text.lower(), None
    chars, index = [], []
    for j, c in enumerate(text):
        f = _fold(c)
        chars.append(f)
        index.extend([j] * len(f))
    return "".join(chars), index


class Redactor:
    """One file's identifying values, compiled once: ``redactor(text)`` is the text with each of them replaced."""

    def __init__(self, values: tuple[str, ...]):
        self.words: set[str] = set()  # parts matched as whole words
        pats: list[str] = []
        ids = 0
        for value in values:
            is_id = value.startswith(ID_MARK)
            v = _canon(value[len(ID_MARK):] if is_id else value)[0].strip()
            if not v:
                continue
            m = _DATE.fullmatch(v)
            if m:  # DA or DT: the date in every common order, with any time after it
                y, mo, d = m.group(1), m.group(2), m.group(3)
                pats += [rf"{y}[-_. /]?{mo}[-_. /]?{d}{_TIME}", rf"{d}[-_. /]{mo}[-_. /]{y}{_TIME}",
                         rf"{mo}[-_. /]{d}[-_. /]{y}{_TIME}"]
                continue
            tokens = [t for t in _SPLIT.split(v) if t]
            if not tokens:
                continue
            if len(tokens) <= MAX_JOINED_TOKENS:
                # the whole value, however separated; more letters or digits may follow (PID12345b.dcm)
                joined = _SEP.join(re.escape(t) for t in tokens)
                if is_id and len(v) >= 5:
                    joined = "[a-z0-9]*" + joined
                pats.append(joined + ("[a-z0-9]*" if len(v) >= 4 or (is_id and len(v) >= 2) else ""))
            for t in tokens:
                if len(tokens) > MAX_JOINED_TOKENS or len(t) >= 3:  # each part alone (JOHN of DOE^JOHN)
                    if _WORD.fullmatch(t):
                        self.words.add(t)
                    else:
                        pats.append(re.escape(t))
                if len(t) >= 5 and any(ch.isdigit() for ch in t) and ids < MAX_SUBSTRING_IDS:
                    ids += 1  # an identifier inside a longer word: x12345y
                    pats.append(r"[a-z0-9]*" + re.escape(t) + r"[a-z0-9]*")
        pats = sorted(set(pats), key=len, reverse=True)
        self.fail_closed = len(pats) > MAX_PATTERNS
        self.rx = None
        if pats and not self.fail_closed:
            self.rx = re.compile(r"(?<![a-z0-9])(?:" + "|".join(pats) + r")(?![a-z0-9])")

    def __call__(self, text: str | None) -> str | None:
        if not text:
            return text
        if self.fail_closed:
            return REDACTED
        ctext, index = _canon(text)
        spans = [m.span() for m in self.rx.finditer(ctext)] if self.rx is not None else []
        if self.words:
            spans += [m.span() for m in _WORD.finditer(ctext) if m.group() in self.words]
        if not spans:
            return text
        merged: list[list[int]] = []
        for s, e in sorted(spans):
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        out, last = [], 0
        for s, e in merged:
            a, b = (s, e) if index is None else (index[s], index[e - 1] + 1)
            while b < len(text) and not _fold(text[b]):  # combining marks of the last letter
                b += 1
            out += [text[last:a], REDACTED]
            last = b
        out.append(text[last:])
        return "".join(out)


@functools.lru_cache(maxsize=16)
def _redactor(values: tuple[str, ...]) -> Redactor:
    return Redactor(values)


def redact(text: str | None, values: list[str]) -> str | None:
    """``text`` with each identifying value (from :func:`identifying_values`), in any of its written
    forms, replaced by [redacted]. A file's rows share one compiled :class:`Redactor`."""
    if not text or not values:
        return text
    return _redactor(tuple(values))(text)


# -- pseudonyms --------------------------------------------------------------------------------------------


def _keyed(key: str, data: bytes) -> bytes:
    """HMAC-SHA256 of ``data`` under the --pseudonymize key."""
    return hmac.new(key.encode(), data, hashlib.sha256).digest()


def pseudonymize(uid: str, key: str | None) -> str:
    """A keyed hash of a UID, itself a valid UID (2.25.<decimal>); the same key gives the same value."""
    if not uid or key is None:
        return uid
    return "2.25." + str(int.from_bytes(_keyed(key, uid.encode())[:16], "big"))


#: Extensions a pseudonym keeps (what kind of file a row was); any other suffix may be part of a name.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".dib", ".tif", ".tiff", ".dcm", ".dicom",
                              ".ima", ".jp2", ".j2k", ".webp", ".gif", ".pgm", ".pnm", ".ppm"})


def pseudonym_path(path: str, key: str) -> str:
    """A path that names no folder or file: ``/pseudonymized/<folder hash>/<file hash><ext>``.

    Keyed hashes (HMAC-SHA256, first 16 hex digits) of the exact folder and path bytes: files of
    one folder share its pseudonym (``--group-by parent`` still groups them), and whoever holds the
    key finds a row's file by hashing candidate paths."""
    def h(text: str) -> str:
        return _keyed(key, os.fsencode(text)).hex()[:16]

    ext = os.path.splitext(path)[1].lower()
    ext = ext if ext in IMAGE_EXTENSIONS else ""  # 'Doe.John' has no extension to keep
    return f"/pseudonymized/{h(os.path.dirname(path))}/{h(path)}{ext}"


def shown_path(path: str, key: str | None) -> str:
    """The path as rows show it: as is, or its pseudonym under --pseudonymize."""
    return pseudonym_path(path, key) if key else path
