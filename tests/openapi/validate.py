#!/usr/bin/env python3
"""Checks recorded API answers against the OpenAPI description.

Usage: python3 tests/openapi/validate.py docs/api.yaml answers.jsonl

Each line of answers.jsonl is one answer:
  {"method":"POST","path":"/api/publish","status":200,
   "body":<parsed JSON body or null>,"headers":{"lower-case-name":"value"}}
(`path` without the query string).

For each answer: the operation (exact path, method lower-cased), then the
response (exact status, else `4XX`/`5XX`, else `default`) must exist (a
`405`, which answers a method the path lacks, is checked against the `405`
documented on that path's operation instead, and fails for a method the
path documents; an answer to HEAD must have no body); the
body must match the response's `application/json` schema (JSON Schema
2020-12, `$ref`s resolved against the whole spec); every response header
marked `required: true` must be present (and a documented header that is
present must match its schema). The spec itself is checked too: every
operation has a 2XX response, every response with content has a schema,
every local `$ref` resolves, every schema is valid 2020-12.

Prints one line per failure, then
`validated N answers against M operations, F failures`, and the
documented (operation, status) pairs no answer covered (information).
Exits 1 on any failure or when the file holds no answer, else 0.

Needs only PyYAML, jsonschema (>= 4.18, with `referencing`) and the
standard library.
"""

import json
import re
import sys

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# The URI the spec document is registered under, for schema `$ref`s.
SPEC_URI = "urn:wsgate:openapi-spec"
STATUS_KEY = re.compile(r"^(default|[1-5][0-9][0-9]|[1-5]XX)$")


class RefError(KeyError):
    """A `$ref` that does not resolve."""

    def __str__(self):
        return str(self.args[0])


def pointer_escape(token):
    return str(token).replace("~", "~0").replace("/", "~1")


def pointer_unescape(token):
    return token.replace("~1", "/").replace("~0", "~")


def stringify_keys(node):
    """YAML reads `200:` as an int; every key of an OpenAPI document is a string."""
    if isinstance(node, dict):
        return {str(k): stringify_keys(v) for k, v in node.items()}
    if isinstance(node, list):
        return [stringify_keys(v) for v in node]
    return node


class Spec:
    def __init__(self, doc):
        self.doc = doc
        self.problems = []
        resource = Resource(contents=doc, specification=DRAFT202012)
        self.registry = Registry().with_resource(SPEC_URI, resource)
        self.validators = {}

    def lookup(self, pointer):
        """The node at a JSON pointer (`/a/b`), or raises KeyError."""
        node = self.doc
        if pointer in ("", "/"):
            return node
        for raw in pointer.lstrip("/").split("/"):
            token = pointer_unescape(raw)
            if isinstance(node, list):
                node = node[int(token)]
            elif isinstance(node, dict):
                node = node[token]
            else:
                raise KeyError(pointer)
        return node

    def deref(self, node, pointer):
        """Follows OpenAPI `$ref`s (local only): the object and its pointer."""
        seen = set()
        while isinstance(node, dict) and "$ref" in node:
            ref = node["$ref"]
            if not isinstance(ref, str) or not ref.startswith("#"):
                raise RefError(f"unsupported $ref {ref!r} at {pointer}")
            if ref in seen:
                raise RefError(f"$ref loop at {ref}")
            seen.add(ref)
            pointer = ref[1:]
            try:
                node = self.lookup(pointer)
            except (KeyError, IndexError, ValueError):
                raise RefError(f"$ref {ref} does not resolve") from None
        return node, pointer

    def validator(self, pointer):
        """A 2020-12 validator for the schema at `pointer` in the spec."""
        if pointer not in self.validators:
            schema = {"$ref": f"{SPEC_URI}#{pointer}"}
            self.validators[pointer] = Draft202012Validator(schema, registry=self.registry)
        return self.validators[pointer]

    def operations(self):
        """(method, path, operation, pointer) of every operation."""
        paths = self.doc.get("paths") or {}
        for path, item in paths.items():
            item_ptr = "/paths/" + pointer_escape(path)
            try:
                item, item_ptr = self.deref(item, item_ptr)
            except KeyError as e:
                self.problems.append(f"spec {path}: {e}")
                continue
            if not isinstance(item, dict):
                continue
            for method in METHODS:
                if method in item:
                    yield method, path, item[method], f"{item_ptr}/{method}"


def check_refs(spec, node, pointer):
    """Every local `$ref` in the document resolves."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            if ref.startswith("#"):
                try:
                    spec.lookup(ref[1:])
                except (KeyError, IndexError, ValueError):
                    spec.problems.append(f"spec {pointer}: $ref {ref} does not resolve")
            else:
                spec.problems.append(f"spec {pointer}: $ref {ref} is not local")
        for k, v in node.items():
            check_refs(spec, v, f"{pointer}/{pointer_escape(k)}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            check_refs(spec, v, f"{pointer}/{i}")


def check_schema(spec, schema, pointer):
    """A schema that is valid JSON Schema 2020-12 (refs are checked apart)."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        spec.problems.append(f"spec {pointer}: invalid schema: {e.message}")


def check_spec(spec):
    """Structural checks of the OpenAPI 3.1 document; fills spec.problems.

    Returns {(method, path): {status key: (response, pointer)}}."""
    doc = spec.doc
    version = doc.get("openapi")
    if not isinstance(version, str) or not re.match(r"^3\.1\.\d+$", version):
        spec.problems.append(f"spec: `openapi` is {version!r}, not 3.1.x")
    info = doc.get("info")
    if not isinstance(info, dict) or not info.get("title") or not info.get("version"):
        spec.problems.append("spec: `info` needs `title` and `version`")
    if not isinstance(doc.get("paths"), dict):
        spec.problems.append("spec: no `paths` object")
    check_refs(spec, doc, "")
    for name, schema in ((doc.get("components") or {}).get("schemas") or {}).items():
        check_schema(spec, schema, f"/components/schemas/{pointer_escape(name)}")
    schemes = (doc.get("components") or {}).get("securitySchemes") or {}
    for req in doc.get("security") or []:
        for name in req:
            if name not in schemes:
                spec.problems.append(f"spec: security names unknown scheme {name!r}")

    ops = {}
    checked = set()
    for method, path, op, op_ptr in spec.operations():
        where = f"{method.upper()} {path}"
        if not path.startswith("/"):
            spec.problems.append(f"spec {where}: a path must start with /")
        if not isinstance(op, dict):
            spec.problems.append(f"spec {where}: not an operation object")
            continue
        for i, param in enumerate(op.get("parameters") or []):
            try:
                param, p_ptr = spec.deref(param, f"{op_ptr}/parameters/{i}")
            except KeyError as e:
                spec.problems.append(f"spec {where}: {e}")
                continue
            if not param.get("name") or param.get("in") not in ("query", "header", "path", "cookie"):
                spec.problems.append(f"spec {where}: parameter {i} needs `name` and a valid `in`")
            if "schema" not in param and "content" not in param:
                spec.problems.append(f"spec {where}: parameter {param.get('name')!r} has no schema")
            elif "schema" in param:
                check_schema(spec, param["schema"], f"{p_ptr}/schema")
        if "requestBody" in op:
            try:
                body, b_ptr = spec.deref(op["requestBody"], f"{op_ptr}/requestBody")
                for media, content in (body.get("content") or {}).items():
                    if not isinstance(content, dict) or "schema" not in content:
                        spec.problems.append(f"spec {where}: request body {media} has no schema")
                    else:
                        m_ptr = f"{b_ptr}/content/{pointer_escape(media)}/schema"
                        check_schema(spec, content["schema"], m_ptr)
                if not body.get("content"):
                    spec.problems.append(f"spec {where}: request body without content")
            except KeyError as e:
                spec.problems.append(f"spec {where}: {e}")
        responses = op.get("responses")
        if not isinstance(responses, dict) or not responses:
            spec.problems.append(f"spec {where}: no responses")
            continue
        table = {}
        for key, response in responses.items():
            r_ptr = f"{op_ptr}/responses/{pointer_escape(key)}"
            if not STATUS_KEY.match(key):
                spec.problems.append(f"spec {where} {key}: not a status, nXX range or default")
            try:
                response, r_ptr = spec.deref(response, r_ptr)
            except KeyError as e:
                spec.problems.append(f"spec {where} {key}: {e}")
                continue
            if not isinstance(response, dict) or "description" not in response:
                spec.problems.append(f"spec {where} {key}: a response needs a description")
                continue
            table[key.upper()] = (response, r_ptr)
            if r_ptr in checked:
                continue  # a shared response, checked once
            checked.add(r_ptr)
            for media, content in (response.get("content") or {}).items():
                if not isinstance(content, dict) or "schema" not in content:
                    spec.problems.append(f"spec {where} {key}: content {media} has no schema")
                else:
                    m_ptr = f"{r_ptr}/content/{pointer_escape(media)}/schema"
                    check_schema(spec, content["schema"], m_ptr)
            for hname, header in (response.get("headers") or {}).items():
                try:
                    header, h_ptr = spec.deref(header, f"{r_ptr}/headers/{pointer_escape(hname)}")
                except KeyError as e:
                    spec.problems.append(f"spec {where} {key}: header {hname}: {e}")
                    continue
                if "schema" in header:
                    check_schema(spec, header["schema"], f"{h_ptr}/schema")
        if not any(k.startswith("2") for k in table):
            spec.problems.append(f"spec {where}: no 2XX response")
        ops[(method, path)] = table
    return ops


def pick_response(table, status):
    """The response key for `status`: exact, else nXX, else default."""
    for key in (str(status), f"{str(status)[0]}XX", "DEFAULT"):
        if key in table:
            return key
    return None


def header_value(schema, value):
    """A header's text as the JSON type its schema names."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    try:
        if kind == "integer":
            return int(value.strip())
        if kind == "number":
            return float(value.strip())
        if kind == "boolean":
            return {"true": True, "false": False}[value.strip()]
    except (ValueError, KeyError):
        return value
    return value


def check_answer(spec, ops, record, failures):
    """Checks one answer; returns the (operation, key) it covered, if any."""
    method = str(record.get("method", "")).lower()
    path = record.get("path")
    status = record.get("status")
    where = f"{method.upper()} {path} {status}"
    if not isinstance(path, str) or not isinstance(status, int) or isinstance(status, bool):
        failures.append(f"{where}: the record needs a string `path` and an integer `status`")
        return None
    if "?" in path:
        failures.append(f"{where}: `path` must not hold the query string")
        return None
    table = ops.get((method, path))
    op_key = (method, path)
    if status == 405:
        # A 405 answers a method the path does not have, so it has no
        # operation of its own: it is checked against the 405 documented
        # on the path's operations. A 405 to a documented method is wrong.
        if table is not None:
            failures.append(f"{where}: 405 for a method the spec documents on this path")
            return None
        for (m, p), t in sorted(ops.items()):
            if p == path and "405" in t:
                table, op_key = t, (m, p)
                break
    if table is None:
        failures.append(f"{where}: no such operation in the spec")
        return None
    key = pick_response(table, status)
    if key is None:
        failures.append(f"{where}: status not documented for this operation")
        return None
    response, r_ptr = table[key]
    body = record.get("body")
    content = response.get("content") or {}
    if method == "head":
        if body is not None:
            failures.append(f"{where}: a body in the answer to HEAD")
    elif "application/json" in content:
        schema_ptr = f"{r_ptr}/content/application~1json/schema"
        try:
            errors = sorted(spec.validator(schema_ptr).iter_errors(body), key=lambda e: list(e.path))
        except Exception as e:  # a broken schema, already reported as a spec problem
            failures.append(f"{where}: the body cannot be validated: {type(e).__name__}: {e}")
            errors = []
        for error in errors:
            at = "/" + "/".join(str(p) for p in error.absolute_path)
            failures.append(f"{where}: body {at}: {error.message}")
    elif content:
        failures.append(f"{where}: the response documents no application/json content")
    elif body is not None:
        failures.append(f"{where}: a body where the spec documents none")
    headers = {str(k).lower(): v for k, v in (record.get("headers") or {}).items()}
    for hname, header in (response.get("headers") or {}).items():
        if hname.lower() == "content-type":
            continue  # OpenAPI ignores a Content-Type response header
        try:
            header, h_ptr = spec.deref(header, f"{r_ptr}/headers/{pointer_escape(hname)}")
        except KeyError:
            continue  # reported as a spec problem
        value = headers.get(hname.lower())
        if value is None:
            if header.get("required"):
                failures.append(f"{where}: required header {hname} missing")
            continue
        if "schema" in header:
            typed = header_value(header["schema"], str(value))
            try:
                for error in spec.validator(f"{h_ptr}/schema").iter_errors(typed):
                    failures.append(f"{where}: header {hname}: {error.message}")
            except Exception as e:  # a broken schema, already reported
                failures.append(f"{where}: header {hname} cannot be validated: {e}")
    return (op_key, key)


def main(argv):
    if len(argv) != 3:
        print(f"usage: {argv[0]} SPEC.yaml ANSWERS.jsonl", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        doc = stringify_keys(yaml.safe_load(f))
    if not isinstance(doc, dict):
        print(f"{argv[1]}: not a YAML mapping", file=sys.stderr)
        return 2
    spec = Spec(doc)
    ops = check_spec(spec)
    failures = list(spec.problems)

    covered = set()
    count = 0
    with open(argv[2], encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            count += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                failures.append(f"line {number}: not JSON: {e}")
                continue
            if not isinstance(record, dict):
                failures.append(f"line {number}: not a JSON object")
                continue
            hit = check_answer(spec, ops, record, failures)
            if hit:
                covered.add(hit)

    for line in failures:
        print(line)
    if count == 0:
        print(f"{argv[2]}: no answers")
    print(f"validated {count} answers against {len(ops)} operations, {len(failures)} failures")
    missing = [
        f"{method.upper()} {path} {key.lower() if key == 'DEFAULT' else key}"
        for (method, path), table in sorted(ops.items(), key=lambda i: (i[0][1], i[0][0]))
        for key in sorted(table)
        if ((method, path), key) not in covered
    ]
    if missing:
        print(f"not covered by any answer ({len(missing)}):")
        for item in missing:
            print(f"  {item}")
    return 1 if failures or count == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
