"""Repository names and tags, validated per the OCI distribution spec grammar."""

from __future__ import annotations

import re

from sigil.errors import NameInvalid, TagInvalid

# distribution-spec: <name> = <component>(/<component>)*,
#   <component> = [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
# distribution limits the full name to 255 characters (reference.NameTotalLengthMax).
MAX_NAME_LENGTH = 255


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid repository name, else raise :class:`NameInvalid`."""
    if not name or len(name) > MAX_NAME_LENGTH:
        raise NameInvalid(f"repository name must be 1 to {MAX_NAME_LENGTH} characters")
    if not _NAME.fullmatch(name):
        raise NameInvalid(f"invalid repository name {name[:100]!r}")
    return name


def validate_tag(tag: str) -> str:
    """Return ``tag`` if valid (``[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}``), else raise TagInvalid."""
    if not _TAG.fullmatch(tag):
        raise TagInvalid(f"invalid tag {tag[:130]!r}")
    return tag
