"""in-toto Statement parsing (v0.1 and v1) and subject matching.

Spec: https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md (and v0.1).
The predicate type that counts is the statement's own signed ``predicateType``; layer
annotations such as ``in-toto.io/predicate-type`` are unsigned hints and never decide.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sigil.errors import VerificationError
from sigil.oci.digest import Digest
from sigil.verify._json import load_object

STATEMENT_V01 = "https://in-toto.io/Statement/v0.1"
STATEMENT_V1 = "https://in-toto.io/Statement/v1"
STATEMENT_TYPES = frozenset({STATEMENT_V01, STATEMENT_V1})
# cosign v3 signs an image with a DSSE statement of this predicate type (sigstore bundle format).
COSIGN_SIGN_PREDICATE = "https://sigstore.dev/cosign/sign/v1"
MAX_STATEMENT_BYTES = 16 * 1024 * 1024
MAX_SUBJECTS = 1024
_HEX = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class Subject:
    """One statement subject: a name and its digests (algorithm -> lowercase hex)."""

    name: str
    digests: tuple[tuple[str, str], ...]

    @property
    def sha256(self) -> str | None:
        """The sha256 hex digest, if the subject has one."""
        for algorithm, value in self.digests:
            if algorithm == "sha256":
                return value
        return None


@dataclass(frozen=True)
class Statement:
    """A parsed in-toto statement. ``document`` is the whole decoded JSON (for conditions)."""

    type: str
    predicate_type: str
    subjects: tuple[Subject, ...]
    predicate: Any
    document: dict[str, Any]

    def names(self, digest: Digest) -> bool:
        """True if one subject's sha256 equals ``digest`` (subjects are what is attested)."""
        return any(s.sha256 == digest.hex for s in self.subjects)


def parse_statement(payload: bytes) -> Statement:
    """Parse an in-toto Statement v0.1 or v1; raise :class:`VerificationError` when malformed."""
    obj = load_object(payload, "in-toto statement", MAX_STATEMENT_BYTES)
    st_type = obj.get("_type")
    if st_type not in STATEMENT_TYPES:
        raise VerificationError(f"unsupported in-toto statement type {str(st_type)[:80]!r}",
                                reason="unsupported")
    predicate_type = obj.get("predicateType")
    if not isinstance(predicate_type, str) or not predicate_type:
        raise VerificationError("in-toto statement lacks predicateType", reason="invalid")
    raw_subjects = obj.get("subject")
    if not isinstance(raw_subjects, list) or not raw_subjects:
        raise VerificationError("in-toto statement has no subject", reason="invalid")
    if len(raw_subjects) > MAX_SUBJECTS:
        raise VerificationError("in-toto statement has too many subjects", reason="invalid")
    subjects = []
    for entry in raw_subjects:
        if not isinstance(entry, dict) or not isinstance(entry.get("digest"), dict):
            raise VerificationError("in-toto subject lacks a digest map", reason="invalid")
        name = entry.get("name", "")
        digests = []
        for algorithm, value in entry["digest"].items():
            if not isinstance(algorithm, str) or not isinstance(value, str):
                raise VerificationError("in-toto subject digest is not a string map",
                                        reason="invalid")
            if algorithm == "sha256" and not _HEX.fullmatch(value):
                raise VerificationError("in-toto subject has a malformed sha256", reason="invalid")
            digests.append((algorithm, value.lower() if algorithm == "sha256" else value))
        subjects.append(Subject(name=name if isinstance(name, str) else "", digests=tuple(digests)))
    return Statement(type=st_type, predicate_type=predicate_type, subjects=tuple(subjects),
                     predicate=obj.get("predicate"), document=obj)
