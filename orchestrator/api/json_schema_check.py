"""Checks of the JSON schemas a request brings (response_format, tool parameters) before any grammar is built.

Two kinds of 400, both naming the field (`param`, a dotted path into the request):
- `invalid_json_schema`: not a valid JSON schema (the draft's meta-schema, jsonschema), or a `$ref` that does
  not resolve inside the schema;
- `unsupported_schema_feature`: a keyword the grammar would accept but not enforce (measured with xgrammar,
  docs/structured.md), so the output could break the schema: better a clear 400 than unvalidated output.
Pure functions, torch-free. `validate_instance` re-checks a finished output against the schema.
"""
from __future__ import annotations

import json
from typing import Any

from orchestrator.api.errors import APIError

MAX_SCHEMA_CHARS = 100_000
MAX_DEPTH = 32

# enforced by the grammar (xgrammar 0.2.9, probed keyword by keyword)
FORMATS = frozenset({"email", "date", "date-time", "time", "duration", "uuid", "ipv4", "ipv6", "hostname", "uri",
                     "uri-reference", "json-pointer", "relative-json-pointer", "uri-template"})
# assertion keywords the grammar does not enforce (or, for patternProperties / propertyNames, enforces wrongly)
UNSUPPORTED = {
    "not": "not", "if": "if/then/else", "then": "if/then/else", "else": "if/then/else",
    "dependentRequired": "dependentRequired", "dependentSchemas": "dependentSchemas", "dependencies": "dependencies",
    "contains": "contains", "minContains": "minContains", "maxContains": "maxContains",
    "propertyNames": "propertyNames", "patternProperties": "patternProperties",
    "unevaluatedProperties": "unevaluatedProperties", "unevaluatedItems": "unevaluatedItems",
    "additionalItems": "additionalItems", "$dynamicRef": "$dynamicRef", "$recursiveRef": "$recursiveRef",
}
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")
_SUBSCHEMA_ONE = ("additionalProperties", "items")


def _bad(param: str, message: str, code: str) -> APIError:
    return APIError(400, message, param=param, code=code)


def check_schema(schema: Any, param: str) -> None:
    """Raise APIError(400) unless `schema` is a valid JSON schema whose every assertion the grammar enforces."""
    if not isinstance(schema, dict):
        raise _bad(param, f"{param} must be a JSON schema object", "invalid_json_schema")
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise _bad(param, f"{param} is not JSON-serialisable: {exc}", "invalid_json_schema") from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise _bad(param, f"{param} is {len(text)} characters; the limit is {MAX_SCHEMA_CHARS}", "invalid_json_schema")
    import jsonschema
    from jsonschema.validators import validator_for

    try:
        validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = ".".join(str(p) for p in exc.path)
        at = f"{param}.{where}" if where else param
        raise _bad(at, f"invalid JSON schema at {at}: {exc.message}", "invalid_json_schema") from None
    _walk(schema, schema, param, 0)


def _walk(node: Any, root: dict, path: str, depth: int) -> None:
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise _bad(path, f"{path} must be a schema (an object or a boolean)", "invalid_json_schema")
    if depth > MAX_DEPTH:
        raise _bad(path, f"the schema nests deeper than {MAX_DEPTH} levels at {path}", "unsupported_schema_feature")
    for key, what in UNSUPPORTED.items():
        if key in node:
            raise _bad(f"{path}.{key}", f"the JSON schema keyword '{what}' (at {path}.{key}) is not supported by "
                       "grammar-constrained decoding", "unsupported_schema_feature")
    if node.get("uniqueItems") is True:
        raise _bad(f"{path}.uniqueItems", f"'uniqueItems: true' (at {path}) is not supported by grammar-constrained "
                   "decoding", "unsupported_schema_feature")
    if "format" in node and node["format"] not in FORMATS:
        raise _bad(f"{path}.format", f"the string format '{node['format']}' (at {path}.format) is not supported; "
                   f"supported: {', '.join(sorted(FORMATS))}", "unsupported_schema_feature")
    if isinstance(node.get("items"), list):
        raise _bad(f"{path}.items", f"'items' as a list (at {path}.items) is not supported; use 'prefixItems'",
                   "unsupported_schema_feature")
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
        raise _bad(f"{path}.allOf", f"'allOf' with more than one schema (at {path}.allOf) is not supported",
                   "unsupported_schema_feature")
    if "$ref" in node:
        _resolve(node["$ref"], root, f"{path}.$ref")
    if "oneOf" in node and not _discriminated(node["oneOf"], root):
        raise _bad(f"{path}.oneOf", f"'oneOf' (at {path}.oneOf) is only supported when a required property with a "
                   "distinct 'const' tells its branches apart; use 'anyOf'", "unsupported_schema_feature")
    for key in _SUBSCHEMA_MAPS:
        for name, sub in (node.get(key) or {}).items():
            _walk(sub, root, f"{path}.{key}.{name}", depth + 1)
    for key in _SUBSCHEMA_LISTS:
        for i, sub in enumerate(node.get(key) or []):
            _walk(sub, root, f"{path}.{key}.{i}", depth + 1)
    for key in _SUBSCHEMA_ONE:
        if isinstance(node.get(key), dict):
            _walk(node[key], root, f"{path}.{key}", depth + 1)


def _resolve(ref: Any, root: dict, param: str) -> Any:
    if not isinstance(ref, str) or not ref.startswith("#"):
        raise _bad(param, f"only local references ('#/...') are supported, got {ref!r} at {param}",
                   "unsupported_schema_feature")
    node: Any = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise _bad(param, f"the reference {ref!r} at {param} does not resolve inside the schema",
                       "invalid_json_schema")
    return node


def _deref(node: Any, root: dict, hops: int = 0) -> Any:
    while isinstance(node, dict) and "$ref" in node and hops < 16:
        node, hops = _resolve(node["$ref"], root, "$ref"), hops + 1
    return node


def _discriminated(branches: Any, root: dict) -> bool:
    """True when some property is required in every branch with a distinct single constant in each."""
    subs = [_deref(b, root) for b in branches or []]
    if len(subs) < 2 or not all(isinstance(s, dict) for s in subs):
        return len(subs) < 2
    common = set.intersection(*(set(s.get("required") or []) for s in subs))
    for prop in sorted(common):
        values = []
        for s in subs:
            p = _deref((s.get("properties") or {}).get(prop), root)
            if isinstance(p, dict) and "const" in p:
                values.append(json.dumps(p["const"], sort_keys=True))
            elif isinstance(p, dict) and isinstance(p.get("enum"), list) and len(p["enum"]) == 1:
                values.append(json.dumps(p["enum"][0], sort_keys=True))
            else:
                break
        else:
            if len(set(values)) == len(values):
                return True
    return False


def validate_instance(instance: Any, schema: dict) -> str | None:
    """None when `instance` satisfies `schema`, else the first error's message (the output guard)."""
    import jsonschema
    from jsonschema.validators import validator_for

    cls = validator_for(schema, default=jsonschema.Draft202012Validator)
    err = next(iter(cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(instance)), None)
    return None if err is None else f"{err.message} (at /{'/'.join(str(p) for p in err.absolute_path)})"
