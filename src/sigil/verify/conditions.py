"""JMESPath conditions over a verified in-toto statement.

A condition is ``{key: <JMESPath>, operator: <op>, value: <JSON value>}``; ``all:`` / ``any:``
groups nest. A plain list is an ``all`` group. Operators (names as in Kyverno conditions):

* ``Equals`` / ``NotEquals``: JSON equality (``true`` is not ``1``; ``"1"`` is not ``1``).
* ``In``: the result is one of ``value`` (a list).
* ``Matches``: ``value`` is a Python regular expression matched against the whole string
  result (anchored with ``re.fullmatch``).
* ``Exists``: the key is present (``value: false`` for absent).

Fail closed: for every operator except ``Exists``, a key that is absent (JMESPath ``null``)
makes the condition fail, including ``NotEquals``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import jmespath
import jmespath.exceptions
from jmespath.parser import ParsedResult

from sigil.errors import ConfigError

OPERATORS = ("Equals", "NotEquals", "In", "Matches", "Exists")
# Matches is applied to attacker-supplied strings; bound their length (regexps are admin-written).
MAX_MATCH_INPUT = 64 * 1024
MAX_DEPTH = 8


@dataclass(frozen=True)
class Condition:
    """One comparison of a JMESPath result with a value."""

    key: str
    operator: str
    value: Any
    expression: ParsedResult
    pattern: re.Pattern[str] | None = None

    def evaluate(self, document: Any) -> tuple[bool, str]:
        """Return (passed, explanation)."""
        try:
            result = self.expression.search(document)
        except jmespath.exceptions.JMESPathError as exc:
            return False, f"{self.key}: evaluation failed ({exc})"
        shown = _short(result)
        if self.operator == "Exists":
            want = self.value is not False
            ok = (result is not None) == want
            return ok, f"{self.key} {'exists' if result is not None else 'is absent'}"
        if result is None:
            return False, f"{self.key} is absent"
        if self.operator == "Equals":
            ok = _json_equal(result, self.value)
            return ok, f"{self.key} = {shown}" + ("" if ok else f", expected {_short(self.value)}")
        if self.operator == "NotEquals":
            ok = not _json_equal(result, self.value)
            why = "" if ok else f", must not be {_short(self.value)}"
            return ok, f"{self.key} = {shown}{why}"
        if self.operator == "In":
            ok = any(_json_equal(result, v) for v in self.value)
            return ok, f"{self.key} = {shown}" + ("" if ok else f", not in {_short(self.value)}")
        # Matches
        assert self.pattern is not None
        if not isinstance(result, str) or len(result) > MAX_MATCH_INPUT:
            return False, f"{self.key} = {shown} is not a string to match"
        ok = self.pattern.fullmatch(result) is not None
        return ok, f"{self.key} = {shown}" + ("" if ok else f", does not match {self.value!r}")


@dataclass(frozen=True)
class ConditionGroup:
    """``all`` (every item passes) or ``any`` (at least one passes) of conditions/groups."""

    mode: str
    items: tuple[Condition | ConditionGroup, ...]

    def evaluate(self, document: Any) -> tuple[bool, list[str]]:
        """Return (passed, one explanation per failing condition, or the passing ones)."""
        results = []
        for item in self.items:
            if isinstance(item, Condition):
                ok, why = item.evaluate(document)
                results.append((ok, [why]))
            else:
                results.append(item.evaluate(document))
        if self.mode == "all":
            failed = [w for ok, whys in results if not ok for w in whys]
            return (not failed), (failed or [w for _, whys in results for w in whys])
        passed = [w for ok, whys in results if ok for w in whys]
        if passed:
            return True, passed
        return False, ["none of: " + "; ".join(w for _, whys in results for w in whys)]

    def canonical(self) -> Any:
        """A JSON-able form (for the policy fingerprint)."""
        return {self.mode: [i.canonical() if isinstance(i, ConditionGroup)
                            else {"key": i.key, "operator": i.operator, "value": i.value}
                            for i in self.items]}


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def _json_equal(a: Any, b: Any) -> bool:
    """Equality with JSON types: bool is not a number, int 1 equals float 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=False))
    return bool(a == b)


def parse_conditions(obj: Any, *, file: str, key: str, _depth: int = 0) -> ConditionGroup:
    """Parse a ``conditions`` value (a list, or ``{all: [...]}`` / ``{any: [...]}``).

    Raises :class:`ConfigError` naming ``file`` and ``key`` for an unknown operator, a bad
    JMESPath expression, a bad regular expression, or an unknown field.
    """
    if _depth > MAX_DEPTH:
        raise ConfigError("conditions are nested too deeply", file=file, key=key)
    if isinstance(obj, list):
        mode, items = "all", obj
    elif isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("all", "any"):
        mode, items = next(iter(obj.items()))
        if not isinstance(items, list):
            raise ConfigError(f"'{mode}' must be a list", file=file, key=key)
        key = f"{key}.{mode}"
    else:
        raise ConfigError("conditions must be a list or a single {all: [...]} / {any: [...]}",
                          file=file, key=key)
    if not items:
        raise ConfigError("a condition group must not be empty", file=file, key=key)
    parsed: list[Condition | ConditionGroup] = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        if isinstance(item, dict) and len(item) == 1 and next(iter(item)) in ("all", "any"):
            parsed.append(parse_conditions(item, file=file, key=where, _depth=_depth + 1))
        else:
            parsed.append(_parse_condition(item, file=file, key=where))
    return ConditionGroup(mode=mode, items=tuple(parsed))


def _parse_condition(item: Any, *, file: str, key: str) -> Condition:
    if not isinstance(item, dict):
        raise ConfigError("a condition must be a mapping {key, operator, value}",
                          file=file, key=key)
    unknown = set(item) - {"key", "operator", "value"}
    if unknown:
        raise ConfigError(f"unknown condition field(s) {sorted(unknown)}", file=file, key=key)
    expr_text, operator = item.get("key"), item.get("operator")
    if not isinstance(expr_text, str) or not expr_text:
        raise ConfigError("a condition needs 'key' (a JMESPath expression)", file=file, key=key)
    if operator not in OPERATORS:
        raise ConfigError(f"unknown operator {operator!r}; expected one of {', '.join(OPERATORS)}",
                          file=file, key=f"{key}.operator")
    try:
        expression = jmespath.compile(expr_text)
    except jmespath.exceptions.JMESPathError as exc:
        raise ConfigError(f"invalid JMESPath expression {expr_text!r}: {exc}",
                          file=file, key=f"{key}.key") from exc
    value = item.get("value")
    pattern = None
    if operator == "Exists":
        if "value" in item and not isinstance(value, bool):
            raise ConfigError("Exists takes value true or false", file=file, key=f"{key}.value")
        value = item.get("value", True)
    elif "value" not in item:
        raise ConfigError(f"operator {operator} needs a 'value'", file=file, key=key)
    elif operator == "In" and not isinstance(value, list):
        raise ConfigError("operator In needs a list value", file=file, key=f"{key}.value")
    elif operator == "Matches":
        if not isinstance(value, str):
            raise ConfigError("operator Matches needs a string regular expression",
                              file=file, key=f"{key}.value")
        try:
            pattern = re.compile(value)
        except re.error as exc:
            raise ConfigError(f"bad regular expression {value!r}: {exc}",
                              file=file, key=f"{key}.value") from exc
    return Condition(key=expr_text, operator=operator, value=value, expression=expression,
                     pattern=pattern)
