"""The policy engine: from a manifest to an allow/deny :class:`Verdict`.

Order of a decision (DESIGN.md "Verification", "Policy file"):

1. every policy whose ``images`` glob matches ``<registry>/<repository>``; none -> deny
   (fail closed);
2. discovery (:mod:`sigil.verify.discovery`, async, capped in count, size and time);
3. the checks, in a worker thread (crypto is CPU work; DESIGN.md: "CPU work runs off the event
   loop with bounded concurrency"). For each policy:

   * ``static``: pass or deny;
   * signatures: a signature counts for an authority when the authority verifies it
     cryptographically *and* the signed content names the served digest (simple-signing
     ``docker-manifest-digest``; a cosign v3 ``https://sigstore.dev/cosign/sign/v1``
     statement subject; a bundle message digest equal to the manifest digest). At least
     ``threshold`` distinct authorities must have one;
   * attestations: each listed predicate type must be present in a statement authenticated by
     one of the policy's authorities (its own DSSE signature; a signature on the attestation
     manifest that carries it, whose ``subject`` must be the served manifest; or, for
     BuildKit in-index attestations, a verified signature on the index), naming the digest
     as a subject; every such statement must satisfy the conditions.
     For an index: statements naming the index itself, else every image child must satisfy
     the requirement;
4. every matching policy must pass (``mode: warn`` failures are logged and counted, not
   enforced).

Signed bytes are the only input to a decision; annotations, ``artifactType`` and DSSE
``keyid`` only choose what to try.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sigil import metrics
from sigil.errors import SigilError, VerificationError
from sigil.logs import get_logger
from sigil.oci.digest import Digest
from sigil.oci.manifest import Manifest
from sigil.verify import dsse
from sigil.verify.authority import IN_TOTO, MESSAGE_DIGEST, SIMPLE_SIGNING, VerifiedPayload
from sigil.verify.discovery import (
    BUNDLE_MEDIA_TYPES,
    Artifact,
    ArtifactSource,
    Discoverer,
    Discovery,
)
from sigil.verify.intoto import COSIGN_SIGN_PREDICATE, Statement, parse_statement
from sigil.verify.policy import AuthorityRule, Policy, PolicyRule
from sigil.verify.simplesigning import check_simple_signing, parse_simple_signing

log = get_logger("sigil.verify")

# Bounded values of Verdict.reason / the metric label `reason`.
REASONS = ("ok", "no_policy", "no_signature", "wrong_key", "digest_mismatch",
           "reference_mismatch", "annotation_mismatch", "subject_mismatch",
           "attestation_missing", "condition_failed", "static_deny", "tlog", "identity",
           "certificate", "timestamp", "unsupported", "invalid", "unavailable", "timeout",
           "error")
# The sigstore module's reasons, folded into the bounded set above.
_FOLD = {"signature": "wrong_key", "no_key": "wrong_key", "malformed": "invalid",
         "chain": "certificate", "expired": "certificate", "sct": "certificate"}
# Reasons that depend on the moment (upstream, time): never cache such a verdict.
TRANSIENT_REASONS = frozenset({"unavailable", "timeout", "error"})
_TEXT = {
    "wrong_key": "wrong key", "digest_mismatch": "payload digest mismatch",
    "reference_mismatch": "docker-reference not allowed",
    "annotation_mismatch": "annotation mismatch", "invalid": "malformed",
    "unsupported": "unsupported", "tlog": "transparency log check failed",
    "no_signature": "no signature", "identity": "identity mismatch",
    "subject_mismatch": "attestation manifest subject mismatch",
    "certificate": "certificate not trusted", "timestamp": "no trusted signing time",
}
# Which failure best explains a missing signature (most specific first).
_PRIORITY = ("digest_mismatch", "reference_mismatch", "annotation_mismatch", "identity",
             "certificate", "tlog", "timestamp", "wrong_key", "unsupported", "invalid",
             "no_signature")
_MAX_LISTED = 6
_EXECUTOR: ThreadPoolExecutor | None = None
CRYPTO_WORKERS = 4


def _executor() -> ThreadPoolExecutor:
    """One bounded pool for verification CPU work, shared by every Verifier."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=CRYPTO_WORKERS,
                                       thread_name_prefix="sigil-verify")
    return _EXECUTOR


def _bounded(reason: str) -> str:
    return reason if reason in REASONS else "invalid"


@dataclass(frozen=True)
class PolicyResult:
    """The outcome of one matching policy."""

    name: str
    mode: str
    passed: bool
    reasons: list[str]
    reason: str = "ok"


@dataclass
class Verdict:
    """An allow/deny decision for one manifest digest.

    ``related`` lists (repo, digest) of every signature/attestation manifest and blob the
    decision used; the mirror makes them servable. ``checks`` lists every check with its
    outcome (``sigil verify`` prints them).
    """

    allowed: bool
    image: str
    digest: Digest
    policies: list[PolicyResult]
    message: str
    reason: str
    related: list[tuple[str, Digest]] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    @property
    def cacheable(self) -> bool:
        """False when the outcome depends on the moment (upstream down, timeout, crash)."""
        return self.reason not in TRANSIENT_REASONS

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form (for ``sigil verify --json`` and the verdict cache)."""
        return {
            "allowed": self.allowed, "image": self.image, "digest": str(self.digest),
            "reason": self.reason, "message": self.message,
            "policies": [{"name": p.name, "mode": p.mode, "passed": p.passed,
                          "reason": p.reason, "reasons": p.reasons} for p in self.policies],
            "related": [[repo, str(d)] for repo, d in self.related],
            "checks": self.checks,
        }


@dataclass
class _Authenticated:
    """A statement whose bytes are authenticated by ``authorities``."""

    statement: Statement
    authorities: frozenset[str]
    artifact: Artifact
    how: str


@dataclass
class _SignatureOutcome:
    passed: dict[str, list[Artifact]] = field(default_factory=dict)  # authority -> artifacts
    failures: list[str] = field(default_factory=list)               # one reason per candidate
    checked: int = 0
    statements: list[_Authenticated] = field(default_factory=list)
    extra: list[Artifact] = field(default_factory=list)  # signatures on attestation manifests


class Verifier:
    """Evaluates manifests against a :class:`~sigil.verify.policy.Policy`."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    @property
    def fingerprint(self) -> str:
        """The policy fingerprint (part of the verdict cache key)."""
        return self.policy.fingerprint

    async def evaluate(self, image: str, repo: str, manifest: Manifest, source: ArtifactSource,
                       *, parent_verified: bool = False) -> Verdict:
        """Decide whether ``manifest`` (pulled as ``image`` = ``<registry>/<repository>``,
        stored in upstream repository ``repo``) may be served.

        ``parent_verified``: the manifest was reached by digest from an index that passed
        this policy (its bytes are covered by the index signature; the index decision
        checked per-child attestations). A manifest requested alone must carry its own
        signature. Never raises for verification problems: they become a deny.
        """
        started = time.monotonic()
        rules = self.policy.matching(image)
        try:
            if not rules:
                verdict = Verdict(False, image, manifest.digest, [],
                                  f"no policy matches {image!r} (fail closed)", "no_policy",
                                  checks=[f"policy: no policy matches {image}"])
            elif parent_verified:
                verdict = self._through_parent(image, manifest, rules)
            else:
                verdict = await self._evaluate(image, repo, manifest, source, rules)
        except Exception as exc:
            log.exception("verify.error", image=image, digest=str(manifest.digest))
            verdict = Verdict(False, image, manifest.digest,
                              [PolicyResult(r.name, r.mode, False, [f"internal error: {exc}"],
                                            "error") for r in rules],
                              f"verification error: {exc}", "error")
        self._record(verdict, time.monotonic() - started)
        return verdict

    # --- paths -------------------------------------------------------------------------------

    def _through_parent(self, image: str, manifest: Manifest,
                        rules: Sequence[PolicyRule]) -> Verdict:
        results = []
        for rule in rules:
            if rule.static == "deny":
                results.append(PolicyResult(rule.name, rule.mode, False,
                                            ["static: deny"], "static_deny"))
            else:
                results.append(PolicyResult(rule.name, rule.mode, True,
                                            ["covered by the verified index that lists it"]))
        return _combine(image, manifest.digest, results, [],
                        ["parent: reached by digest from a verified index"])

    async def _evaluate(self, image: str, repo: str, manifest: Manifest, source: ArtifactSource,
                        rules: Sequence[PolicyRule]) -> Verdict:
        active = [r for r in rules if r.static is None]
        disc: Discovery | None = None
        timed_out = False
        if active:
            extra = [r.signature_repository for r in active if r.signature_repository]
            children = manifest.is_index and any(r.attestations for r in active)
            discoverer = Discoverer(source, self.policy.limits)
            try:
                async with asyncio.timeout(self.policy.limits.timeout):
                    disc = await discoverer.discover(repo, manifest, extra_repos=extra,
                                                     children=children)
            except TimeoutError:
                timed_out = True
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_executor(), self._decide, image, manifest, rules,
                                          disc, timed_out)

    def _decide(self, image: str, manifest: Manifest, rules: Sequence[PolicyRule],
                disc: Discovery | None, timed_out: bool) -> Verdict:
        checks: list[str] = []
        related: list[tuple[str, Digest]] = []
        if disc is not None:
            checks.extend(f"discovery: {n}" for n in disc.notes)
            checks.extend(f"discovery error: {e}" for e in disc.errors)
            checks.extend(f"discovery: {c}" for c in disc.capped)
        results = []
        for rule in rules:
            if rule.static is not None:
                passed = rule.static == "pass"
                checks.append(f"policy {rule.name}: static {rule.static}")
                results.append(PolicyResult(rule.name, rule.mode, passed,
                                            [f"static: {rule.static}"],
                                            "ok" if passed else "static_deny"))
                continue
            if timed_out or disc is None:
                checks.append(f"policy {rule.name}: discovery timed out")
                results.append(PolicyResult(rule.name, rule.mode, False,
                                            [(f"discovery took longer than "
                                              f"{self.policy.limits.timeout:g}s")], "timeout"))
                continue
            result, used = _evaluate_rule(rule, disc, checks)
            if not result.passed and result.reason != "condition_failed":
                if disc.errors:
                    # A fetch failed: "no valid signature" may only mean "could not look". Do
                    # not let an upstream outage become a cached deny.
                    result = PolicyResult(result.name, result.mode, False,
                                          result.reasons + [("discovery incomplete: "
                                                             + "; ".join(disc.errors[:3]))],
                                          "unavailable")
                elif disc.capped:
                    # A cap is policy, not an accident: the deny stands, and says why.
                    result = PolicyResult(result.name, result.mode, False,
                                          result.reasons + [("discovery stopped: "
                                                             + "; ".join(disc.capped[:3]))],
                                          result.reason)
            results.append(result)
            if result.passed:
                for artifact in used:
                    related.extend(artifact.related())
                related.extend(disc.related)
        return _combine(image, manifest.digest, results, list(dict.fromkeys(related)), checks)

    # --- recording ---------------------------------------------------------------------------

    def _record(self, verdict: Verdict, seconds: float) -> None:
        metrics.VERIFY_SECONDS.observe(seconds)
        if not verdict.policies:
            metrics.VERIFICATIONS.labels(policy="", result="denied", reason=verdict.reason).inc()
        for p in verdict.policies:
            result = "allowed" if p.passed else ("warned" if p.mode == "warn" else "denied")
            metrics.VERIFICATIONS.labels(policy=p.name, result=result,
                                         reason=_bounded(p.reason)).inc()
        fields = {"image": verdict.image, "digest": str(verdict.digest),
                  "policies": [p.name for p in verdict.policies], "reason": verdict.reason,
                  "seconds": round(seconds, 4)}
        if not verdict.allowed:
            log.warning("verify.denied", message=verdict.message, **fields)
        elif any(not p.passed for p in verdict.policies):
            log.warning("verify.failed", mode="warn", message=verdict.message, **fields)
        else:
            log.info("verify.allowed", **fields)


def _combine(image: str, digest: Digest, results: list[PolicyResult],
             related: list[tuple[str, Digest]], checks: list[str]) -> Verdict:
    failing = [r for r in results if not r.passed]
    enforced = [r for r in failing if r.mode == "enforce"]
    allowed = not enforced
    if not failing:
        names = ", ".join(f'"{r.name}"' for r in results)
        message = f"allowed by policy {names}"
        reason = "ok"
    else:
        message = "; ".join(f'policy "{r.name}"{" (warn)" if r.mode == "warn" else ""}: '
                            + "; ".join(r.reasons) for r in (enforced or failing))
        reason = _bounded((enforced or failing)[0].reason)
    return Verdict(allowed=allowed, image=image, digest=digest, policies=results,
                   message=message, reason=reason, related=related if allowed else [],
                   checks=checks)


# --- the checks (run in a worker thread) --------------------------------------------------------

def _evaluate_rule(rule: PolicyRule, disc: Discovery,
                   checks: list[str]) -> tuple[PolicyResult, list[Artifact]]:
    """Evaluate one authority policy against what discovery found."""
    subject = disc.subject
    sig = _signatures(rule, subject, disc.artifacts, checks)
    used: list[Artifact] = [a for arts in sig.passed.values() for a in arts]
    used += [s.artifact for s in sig.statements] + sig.extra
    if len(sig.passed) < rule.threshold:
        return PolicyResult(rule.name, rule.mode, False,
                            [_no_signature_text(rule, sig)], _signature_reason(sig)), used
    names = ", ".join(f'"{n}"' for n in sorted(sig.passed))
    reasons = [f"signed by authority {names}"]
    for att in rule.attestations:
        ok, reason, why, att_used = _check_attestation(rule, att, disc, sig, checks)
        used += att_used
        if not ok:
            return PolicyResult(rule.name, rule.mode, False, [why], reason), used
        reasons.append(why)
    return PolicyResult(rule.name, rule.mode, True, reasons), used


def _no_signature_text(rule: PolicyRule, sig: _SignatureOutcome) -> str:
    names = [a.name for a in rule.authorities]
    who = (f'authority "{names[0]}"' if len(names) == 1
           else "authorities " + ", ".join(f'"{n}"' for n in names))
    if rule.threshold > 1:
        head = (f"{len(sig.passed)} of the required {rule.threshold} authorities signed "
                f"(of {who})")
    else:
        head = f"no valid signature from {who}"
    if not sig.checked:
        return f"{head} (no signatures found)"
    listed = "; ".join(_TEXT.get(f, f) for f in sig.failures[:_MAX_LISTED])
    more = "; ..." if len(sig.failures) > _MAX_LISTED else ""
    plural = "signature" if sig.checked == 1 else "signatures"
    return f"{head} ({sig.checked} {plural} checked: {listed}{more})" if listed \
        else f"{head} ({sig.checked} {plural} checked)"


def _signature_reason(sig: _SignatureOutcome) -> str:
    if not sig.checked:
        return "no_signature"
    for reason in _PRIORITY:
        if reason in sig.failures:
            return reason
    return _bounded(sig.failures[0]) if sig.failures else "no_signature"


def _subject_matches(artifact: Artifact, subject: Manifest) -> bool:
    """The attestation manifest's ``subject`` descriptor is exactly the served manifest."""
    s = artifact.manifest.subject
    return (s is not None and s.digest == subject.digest and s.media_type == subject.media_type
            and s.size == len(subject.raw))


def _signatures(rule: PolicyRule, subject: Manifest, artifacts: list[Artifact],
                checks: list[str], *, nested: bool = False) -> _SignatureOutcome:
    """Try every candidate layer with every authority of ``rule`` for ``subject``."""
    out = _SignatureOutcome()
    digest = subject.digest
    for artifact in artifacts:
        manifest_auth: frozenset[str] | None = None
        for layer in artifact.manifest.layers:
            blob = artifact.blobs.get(layer.digest)
            if blob is None:
                continue
            where = f"{artifact.via} {artifact.manifest.digest} layer {layer.digest}"
            media_type = layer.media_type
            content = _json(blob)
            if media_type == IN_TOTO and not dsse.looks_like_envelope(content):
                # Raw statement: authenticated only by a signature on the manifest carrying it.
                if nested:
                    continue
                if manifest_auth is None:
                    manifest_auth, signers = _manifest_signers(rule, artifact, subject, checks)
                    out.extra.extend(signers)
                if not manifest_auth:
                    checks.append(f"{where}: raw in-toto statement, carrying manifest not "
                                  f"signed by this policy's authorities")
                    continue
                try:
                    statement = parse_statement(blob)
                except VerificationError as exc:
                    checks.append(f"{where}: {exc}")
                    continue
                out.statements.append(_Authenticated(statement, manifest_auth, artifact,
                                                     "signed attestation manifest"))
                checks.append(f"{where}: statement {statement.predicate_type} authenticated by "
                              f"the signature on its manifest ({', '.join(sorted(manifest_auth))})")
                continue
            kind = _kind(media_type, content)
            if kind is None:
                continue
            is_signature_candidate = kind in ("simple", "bundle")
            failure: str | None = None
            counted = False
            direct = False
            for ar in rule.authorities:
                try:
                    payload = _verify(ar, kind, blob, layer.annotations)
                    counted_here, verified = _interpret(ar, payload, digest)
                except VerificationError as exc:
                    failure = _better(failure, exc.reason)
                    checks.append(f"{where} [{ar.name}]: {exc.reason}: {exc}")
                    continue
                signer_checks = "; ".join(payload.signer.checks)
                if counted_here:
                    counted = True
                    out.passed.setdefault(ar.name, []).append(artifact)
                    checks.append(f"{where} [{ar.name}]: signature ok, names {digest} "
                                  f"({signer_checks})")
                if verified is not None:
                    direct = True
                    out.statements.append(_Authenticated(verified, frozenset({ar.name}),
                                                         artifact, f"signed {kind}"))
                    checks.append(f"{where} [{ar.name}]: statement {verified.predicate_type} "
                                  f"verified ({signer_checks})")
            # A bundle that verified as an attestation (not cosign's sign predicate) is not a
            # signature candidate: it neither counts nor explains a missing signature.
            if is_signature_candidate and not (kind == "bundle" and direct and not counted):
                out.checked += 1
                if not counted:
                    out.failures.append(failure or "invalid")
            if kind == "dsse" and media_type == IN_TOTO and not nested and not direct:
                # DHI: a DSSE layer of an attestation manifest is also authenticated by a
                # signature on that manifest (the manifest names the layer by digest).
                if manifest_auth is None:
                    manifest_auth, signers = _manifest_signers(rule, artifact, subject, checks)
                    out.extra.extend(signers)
                if manifest_auth:
                    try:
                        envelope = dsse.parse_envelope(blob)
                        if envelope.payload_type != IN_TOTO:
                            raise VerificationError("DSSE payloadType is not in-toto",
                                                    reason="unsupported")
                        statement = parse_statement(envelope.payload)
                    except VerificationError as exc:
                        checks.append(f"{where}: {exc}")
                        continue
                    out.statements.append(_Authenticated(statement, manifest_auth, artifact,
                                                         "signed attestation manifest"))
                    checks.append(f"{where}: statement {statement.predicate_type} "
                                  f"authenticated by the signature on its manifest")
    return out


def _manifest_signers(rule: PolicyRule, artifact: Artifact, subject: Manifest,
                      checks: list[str]) -> tuple[frozenset[str], list[Artifact]]:
    """Authorities with a valid signature on ``artifact.manifest`` (DHI attestation manifest)
    and the signature artifacts used; empty unless its ``subject`` is exactly ``subject``
    (digest, media type and size)."""
    if not _subject_matches(artifact, subject):
        checks.append(f"{artifact.via} {artifact.manifest.digest}: subject is not "
                      f"{subject.digest} ({subject.media_type}, {len(subject.raw)} bytes)")
        return frozenset(), []
    inner = _signatures(rule, artifact.manifest, artifact.signatures, checks, nested=True)
    return frozenset(inner.passed), [a for arts in inner.passed.values() for a in arts]


def _json(blob: bytes) -> Any:
    try:
        return json.loads(blob)
    except (ValueError, RecursionError):
        return None


def _kind(media_type: str, content: Any) -> str | None:
    if media_type == SIMPLE_SIGNING:
        return "simple"
    if media_type in BUNDLE_MEDIA_TYPES:
        return "bundle"
    if media_type in (dsse.ENVELOPE_MEDIA_TYPE, IN_TOTO) and dsse.looks_like_envelope(content):
        return "dsse"
    return None


def _verify(ar: AuthorityRule, kind: str, blob: bytes,
            annotations: dict[str, str]) -> VerifiedPayload:
    try:
        if kind == "bundle":
            return ar.authority.verify_bundle(blob)
        media_type = SIMPLE_SIGNING if kind == "simple" else dsse.ENVELOPE_MEDIA_TYPE
        return ar.authority.verify_cosign_layer(blob=blob, media_type=media_type,
                                                annotations=annotations)
    except VerificationError as exc:
        if exc.reason in _FOLD:
            raise VerificationError(str(exc), reason=_FOLD[exc.reason]) from exc
        raise
    except SigilError as exc:
        # e.g. ConfigError for a misused verifier: fail closed, never crash the decision.
        raise VerificationError(str(exc), reason="invalid") from exc


def _interpret(ar: AuthorityRule, payload: VerifiedPayload,
               digest: Digest) -> tuple[bool, Statement | None]:
    """What a verified payload says: (is a signature of ``digest``, statement if any)."""
    if payload.payload_type == SIMPLE_SIGNING and payload.payload is not None:
        ss = parse_simple_signing(payload.payload)
        reference = ar.reference
        check_simple_signing(ss, digest=digest,
                             reference_matches=(lambda r: reference.fullmatch(r) is not None)
                             if reference is not None else None,
                             annotations=ar.annotations)
        return True, None
    if payload.payload_type == MESSAGE_DIGEST:
        if payload.message_digest != bytes.fromhex(digest.hex):
            raise VerificationError(f"bundle message digest is not {digest}",
                                    reason="digest_mismatch")
        return True, None
    if payload.payload_type == IN_TOTO and payload.payload is not None:
        statement = parse_statement(payload.payload)
        if statement.predicate_type == COSIGN_SIGN_PREDICATE:
            # cosign v3: a signature is a statement of this predicate naming the image.
            if not statement.names(digest):
                raise VerificationError(f"cosign signature statement does not name {digest}",
                                        reason="digest_mismatch")
            return True, None
        return False, statement
    raise VerificationError(f"unsupported signed payload type {payload.payload_type[:80]!r}",
                            reason="unsupported")


def _better(current: str | None, new: str) -> str:
    if current is None:
        return new
    rank = {r: i for i, r in enumerate(_PRIORITY)}
    return new if rank.get(new, len(rank)) < rank.get(current, len(rank)) else current


def _check_attestation(rule: PolicyRule, att: Any, disc: Discovery, sig: _SignatureOutcome,
                       checks: list[str]) -> tuple[bool, str, str, list[Artifact]]:
    """One ``attestations[]`` entry for the subject (or, for an index, its image children)."""
    subject = disc.subject
    own = [s for s in sig.statements if s.statement.names(subject.digest)]
    if not subject.is_index or any(s.statement.predicate_type == att.predicate_type
                                   for s in own):
        return _check_statements(att, subject.digest, sig.statements, checks)
    if not disc.children_complete:
        return (False, "attestation_missing",
                f'attestation "{att.name}": not every image of the index could be examined', [])
    if not disc.children:
        why = f'attestation "{att.name}" ({att.predicate_type}) missing: the index has no images'
        return False, "attestation_missing", why, []
    index_signers = frozenset(sig.passed)
    used: list[Artifact] = []
    for child_digest, child in disc.children.items():
        child_sig = _signatures(rule, child.subject, child.artifacts, checks)
        statements = list(child_sig.statements)
        used += child_sig.extra
        for art in disc.index_attestations.get(child_digest, []):
            # BuildKit attestation manifest inside the index: its bytes are covered by the
            # index's verified signature (the index lists it by digest).
            for layer in art.manifest.layers:
                blob = art.blobs.get(layer.digest)
                if blob is None:
                    continue
                try:
                    statement = parse_statement(blob)
                except VerificationError as exc:
                    checks.append(f"index attestation {art.manifest.digest} layer "
                                  f"{layer.digest}: {exc}")
                    continue
                statements.append(_Authenticated(statement, index_signers, art,
                                                 "signed index"))
        ok, reason, why, att_used = _check_statements(att, child_digest, statements, checks)
        used += att_used
        if not ok:
            return False, reason, f"image {child_digest}: {why}", used
    why = (f'attestation "{att.name}" ({att.predicate_type}) verified for all '
           f"{len(disc.children)} images of the index")
    return True, "ok", why, used


def _check_statements(att: Any, digest: Digest, statements: list[_Authenticated],
                      checks: list[str]) -> tuple[bool, str, str, list[Artifact]]:
    # The predicate type that counts is the statement's own (signed) predicateType.
    typed = [s for s in statements if s.statement.predicate_type == att.predicate_type]
    matching = [s for s in typed if s.statement.names(digest)]
    if not matching:
        detail = ""
        if typed:
            detail = f" ({len(typed)} signed statement(s) of that type name another subject)"
        elif statements:
            kinds = sorted({s.statement.predicate_type for s in statements})
            detail = f" (signed statements present: {', '.join(kinds[:4])})"
        checks.append(f'attestation "{att.name}" for {digest}: missing{detail}')
        return (False, "attestation_missing",
                f'attestation "{att.name}" ({att.predicate_type}) missing{detail}', [])
    used = [s.artifact for s in matching]
    if att.conditions is not None:
        # Fail closed: every authenticated statement of this type must satisfy the conditions
        # (as cosign verify-attestation --policy does).
        for s in matching:
            ok, whys = att.conditions.evaluate(s.statement.document)
            checks.append(f'attestation "{att.name}" for {digest} ({s.how}): conditions '
                          f'{"pass" if ok else "fail"}: {"; ".join(whys)}')
            if not ok:
                return (False, "condition_failed",
                        f'attestation "{att.name}" fails its conditions: {"; ".join(whys)}',
                        used)
    checks.append(f'attestation "{att.name}" for {digest}: {len(matching)} statement(s) ok')
    return True, "ok", f'attestation "{att.name}" ({att.predicate_type}) verified', used
