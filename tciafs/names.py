"""Turning archive identifiers into file names and back.

The rule (documented in the README):
- '%' and every byte that is illegal or dangerous in a name ('/', NUL, control
  characters, DEL) are written as '%XX' (uppercase hex of the UTF-8 byte);
- a leading '.' is written '%2E', so that '.', '..' and IDs that would look like
  hidden files (and clash with the sidecar dotfiles) stay visible and distinct;
- an empty identifier is written '%';
- a name whose encoding exceeds NAME_MAX bytes is cut and ends in '%~' plus 16 hex
  digits of its SHA-256, which keeps it unique; such names decode only through the
  listing (the xattr user.tcia.id always carries the full identifier).
Everything else, spaces and non-ASCII letters included, is kept as it is, so the
common names read exactly as the archive spells them.
"""

from __future__ import annotations

import hashlib
import re

NAME_MAX = 255
_HASHED_MARK = "%~"
_ESCAPE_RE = re.compile(r"%([0-9A-F]{2})")


def _must_escape(ch: str) -> bool:
    return ch in "%/" or ord(ch) < 0x20 or ord(ch) == 0x7F


# Nearly every identifier (a UID, an ID) has nothing to escape: kept as it is, without
# a look at each character (a walk encodes 10^6 names).
_PLAIN = re.compile(r"[^%/\x00-\x1f\x7f.][^%/\x00-\x1f\x7f]*")


def encode(identifier: str, suffix: str = "") -> str:
    """The file name for `identifier`, plus `suffix`, within NAME_MAX bytes."""
    if (identifier.isascii() and len(identifier) + len(suffix) <= NAME_MAX
            and _PLAIN.fullmatch(identifier)):
        return identifier + suffix
    if identifier == "":
        return "%" + suffix
    parts: list[str] = []
    for i, ch in enumerate(identifier):
        if _must_escape(ch) or (i == 0 and ch == "."):
            parts.extend(f"%{b:02X}" for b in ch.encode())
        else:
            parts.append(ch)
    name = "".join(parts)
    raw = name.encode("utf-8", "surrogateescape")
    room = NAME_MAX - len(suffix.encode())
    if len(raw) <= room:
        return name + suffix
    digest = hashlib.sha256(identifier.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    keep = room - len(_HASHED_MARK) - len(digest)
    head = raw[:keep].decode("utf-8", "ignore")
    # Never cut inside an escape sequence: that would make the head undecodable.
    head = re.sub(r"%[0-9A-F]?$", "", head)
    return f"{head}{_HASHED_MARK}{digest}{suffix}"


def decode(name: str) -> str | None:
    """The identifier a name stands for, or None if only the listing knows it."""
    if name == "%":
        return ""
    if _HASHED_MARK in name:
        return None
    raw = bytearray()
    pos = 0
    for m in _ESCAPE_RE.finditer(name):
        raw += name[pos:m.start()].encode()
        raw.append(int(m.group(1), 16))
        pos = m.end()
    raw += name[pos:].encode()
    return raw.decode("utf-8", "surrogateescape")


def is_canonical(name: str) -> bool:
    """True if `name` is exactly what encode() would produce for its identifier."""
    ident = decode(name)
    return ident is not None and encode(ident) == name


# Names that shells, desktops and version-control tools probe in every directory.
# They can never be archive entries, so they answer ENOENT without a request.
_JUNK_EXACT = frozenset({
    ".hidden", ".git", ".svn", ".hg", ".bzr", "CVS", ".DS_Store", "._.DS_Store",
    "desktop.ini", "Desktop.ini", "Thumbs.db", "autorun.inf", "AutoRun.inf",
    ".directory", ".localized", ".xdg-volume-info", ".Spotlight-V100", ".fseventsd",
    ".metadata_never_index", ".ql_disablethumbnails", ".ql_disablecache", "HEAD",
    ".envrc", ".env", ".python-version", ".tool-versions", ".nvmrc", ".venv",
    "pyvenv.cfg", "__pycache__", ".gitignore", ".gitattributes", ".editorconfig",
})
_JUNK_PREFIXES = (".Trash", "._", ".goutputstream", ".nfs", ".fuse_hidden")


def is_junk(name: str) -> bool:
    return name in _JUNK_EXACT or name.startswith(_JUNK_PREFIXES)
