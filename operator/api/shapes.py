"""Shapes of strings, keys, paths and quantities: each stated once, for the API server and for Python.

A `pattern` or a bound on a field is enforced by both the CRD schema and pydantic.
What a pattern cannot say (a path without `..` segments, a reserved annotation
prefix, a quantity's value) is a `FieldRule`: a CEL expression on the field's own
value (`self`) next to the equal Python predicate. The API server reports a
FieldRule's failure at the field's own path, as pydantic does.

NOTE: regular expressions here are written with few backslashes (`[.]`, not `\\.`) so that
the same text reads alike in Python, Go's RE2 (schema patterns), Rust's regex (pydantic) and a
CEL string literal (`cel_quote` escapes). CEL's `matches` is a search (unanchored), as `re.search` is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation, localcontext
from typing import Any

from pydantic import GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema


@dataclass(frozen=True)
class FieldRule:
    """A rule on one field's value: `cel` for the API server (`self` = the value), `check` for Python.

    Used as `Annotated[T, FieldRule(...)]`; `check` must mean exactly what `cel` means.
    """

    cel: str
    message: str
    check: Callable[[Any], bool]

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        def validate(value: Any) -> Any:
            if not self.check(value):
                raise ValueError(self.message)
            return value

        return core_schema.no_info_after_validator_function(validate, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema.setdefault("x-kubernetes-validations", []).append({"rule": self.cel, "message": self.message})
        return json_schema


def cel_quote(text: str) -> str:
    """A CEL single-quoted string literal of `text` (backslashes escaped; the patterns hold no quotes)."""
    assert "'" not in text, text
    return "'" + text.replace("\\", "\\\\") + "'"


def search(pattern: str, text: str) -> bool:
    """CEL's `matches`: true when `pattern` matches anywhere in `text` (anchor with ^ and $)."""
    # Python's `$` also matches before a final newline; Go's does not. Make Python's exact.
    return re.search(pattern.replace("$", r"\Z"), text) is not None


# ---- Kubernetes names and keys -----------------------------------------------------------------
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # <= 63: Services, label values, child names
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"  # <= 253: PVCs
# A qualified name (label, annotation and node-selector keys): [DNS subdomain prefix "/"] name.
QUALIFIED_NAME = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
QUALIFIED_NAME_LENGTHS = r"^([^/]{1,253}/)?[^/]{1,63}$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"  # with maxLength 63
# Annotation keys a pod must not get from a CR: the kubernetes.io and k8s.io namespaces (AppArmor,
# seccomp, PSS exemptions and whatever Kubernetes adds next) and container-runtime pass-throughs
# (CRI-O, containerd, Kata, crun) that can add devices or change isolation.
RESERVED_ANNOTATION = r"^(([^/]*[.])?(kubernetes[.]io|k8s[.]io)/|(io[.]kubernetes|io[.]containerd|io[.]katacontainers|run[.]oci|io[.]podman)[.])"
MAX_MAP_KEYS = 64
MAX_ANNOTATION_VALUE = 8192


def is_qualified_name(key: str) -> bool:
    return search(QUALIFIED_NAME, key) and search(QUALIFIED_NAME_LENGTHS, key)


def is_reserved_annotation(key: str) -> bool:
    return search(RESERVED_ANNOTATION, key)


_KEYS_CEL = (
    f"self.all(k, k.matches({cel_quote(QUALIFIED_NAME)}) && k.matches({cel_quote(QUALIFIED_NAME_LENGTHS)}))"
)
QUALIFIED_KEYS = FieldRule(
    cel=_KEYS_CEL,
    message="keys must be Kubernetes qualified names ([DNS-subdomain prefix/]name, name <= 63 characters "
    "of [-A-Za-z0-9_.] starting and ending alphanumeric)",
    check=lambda d: all(is_qualified_name(k) for k in d),
)
UNRESERVED_ANNOTATION_KEYS = FieldRule(
    cel=f"self.all(k, !k.matches({cel_quote(RESERVED_ANNOTATION)}))",
    message="annotation keys under kubernetes.io or k8s.io (e.g. AppArmor, seccomp) and container-runtime "
    "keys (io.kubernetes.*, io.containerd.*, io.katacontainers.*, run.oci.*, io.podman.*) are reserved: "
    "a fleet cannot set them on its pods",
    check=lambda d: not any(is_reserved_annotation(k) for k in d),
)

# ---- paths ---------------------------------------------------------------------------------------
PATH_SEGMENT = r"[A-Za-z0-9_+@=,.-]+"  # no whitespace, control characters, `$(`, quotes or `\`
HOST_PATH = rf"^(/{PATH_SEGMENT})+$"  # absolute, not `/`, no empty segments or trailing `/`
SUB_PATH = rf"^({PATH_SEGMENT}(/{PATH_SEGMENT})*)?$"  # relative ('' = the volume's root)
DOT_SEGMENT = r"(^|/)[.][.]?(/|$)"
# Node directories no model weights live in, refused whatever the operator allows.
SYSTEM_DIR = r"^/(proc|sys|dev|etc|boot|root|run|var/run|var/lib/kubelet|var/lib/containerd|var/lib/docker)(/|$)"

NO_DOT_SEGMENTS = FieldRule(
    cel=f"!self.matches({cel_quote(DOT_SEGMENT)})",
    message="must not contain '.' or '..' segments",
    check=lambda s: not search(DOT_SEGMENT, s),
)
NOT_SYSTEM_DIR = FieldRule(
    cel=f"!self.matches({cel_quote(SYSTEM_DIR)})",
    message="must not be a node system directory (/proc, /sys, /dev, /etc, /boot, /root, /run, kubelet or "
    "container runtime state)",
    check=lambda s: not search(SYSTEM_DIR, s),
)


def under_prefix(path: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `path` is one of `prefixes` or lies below one (segment-wise: /models2 is not under /models)."""
    return any(path == p.rstrip("/") or path.startswith(p.rstrip("/") + "/") for p in prefixes)


# ---- other strings ---------------------------------------------------------------------------------
_COMPONENT = r"[a-z0-9]+(([.]|_|__|-+)[a-z0-9]+)*"
# An OCI image reference: [registry[:port]/]path[:tag][@sha256:digest], no whitespace or control chars.
IMAGE_REFERENCE = (
    rf"^([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?([.][A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*(:[0-9]{{1,5}})?/)?"
    rf"{_COMPONENT}(/{_COMPONENT})*(:[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?(@sha256:[a-f0-9]{{64}})?$"
)
# http(s)://host[:port][/path]: host a DNS name, an IPv4 address or a bracketed IPv6 address.
OTLP_ENDPOINT = (
    r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?([.][A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*)"
    r"(:[0-9]{1,5})?(/[-A-Za-z0-9._~%/]*)?$"
)
PORT_IN_RANGE = FieldRule(
    # Guarded by the pattern: CEL rules run even when the pattern already failed, and url() of a
    # non-URL would be an evaluation error instead of this message.
    cel=f"!self.matches({cel_quote(OTLP_ENDPOINT)}) || !self.matches(':[0-9]+(/|$)') "
    "|| int(url(self).getPort()) <= 65535",
    message="the port must be <= 65535",
    check=lambda s: (m := re.search(r":([0-9]+)(/|\Z)", s)) is None or int(m.group(1)) <= 65535,
)
# An OpenAI `model` name: printable, no whitespace, quotes or markup (HF ids such as org/name:tag fit).
SERVED_MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$"

# ---- quantities --------------------------------------------------------------------------------
# Kubernetes' quantity grammar (resource.ParseQuantity), non-negative: a number, then a binary-SI,
# decimal-SI or exponent suffix. `1.2.3Gi`, `1 Gi`, `1K`, `-1` and `.` do not match.
QUANTITY_PATTERN = r"^[+]?([0-9]+([.][0-9]*)?|[.][0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][-+]?[0-9]+)?$"
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


def quantity(value: int | str) -> Decimal:
    """The exact value of a Kubernetes quantity (int or string); ValueError when it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int):
        return Decimal(value)
    match = re.fullmatch(QUANTITY_PATTERN.strip("^$"), value)
    if match is None:
        raise ValueError(f"not a quantity: {value!r}")
    number, suffix = match.group(1), match.group(3) or ""
    with localcontext() as ctx:
        ctx.prec = 200
        try:
            if suffix in _BINARY:
                return Decimal(number) * (Decimal(1024) ** _BINARY[suffix])
            if suffix in _DECIMAL:
                return Decimal(number).scaleb(_DECIMAL[suffix])
            exponent = int(suffix[1:])
            if not -(2**31) <= exponent < 2**31:  # Kubernetes parses the exponent as an int32
                raise ValueError(f"exponent out of range: {value!r}")
            return Decimal(f"{number}E{exponent}")
        except InvalidOperation as exc:
            raise ValueError(f"not a quantity: {value!r}") from exc


def is_quantity(value: Any) -> bool:
    try:
        quantity(value)
    except ValueError:
        return False
    return True


NON_NEGATIVE_QUANTITY = FieldRule(
    # Schema patterns do not apply to integers: -1 passes a pattern, not this rule.
    cel="isQuantity(string(self)) && !quantity(string(self)).isLessThan(quantity('0'))",
    message="must be a non-negative quantity (e.g. 2, 500m, 16Gi)",
    check=lambda v: is_quantity(v) and quantity(v) >= 0,
)

GPU = "nvidia.com/gpu"
# The resources a role may name, with the largest amount one pod may ask for (documented in Resources).
RESOURCE_LIMITS: dict[str, str] = {
    "cpu": "256",
    "memory": "4Ti",
    "ephemeral-storage": "16Ti",
    GPU: "16",
}
