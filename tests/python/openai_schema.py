"""Validation of response bodies against OpenAI's published OpenAPI document.

The document is pinned in tests/fixtures/openai-openapi/ (its README says where it comes from).
It is loaded once, as one JSON Schema resource in the OpenAPI 3.1 dialect, and each body is
validated against `#/components/schemas/<Name>` with every `$ref` resolved inside the document.
Nothing here describes a response by hand: the two adjustments below are to how the document
is read, and each is explained where it is made.
"""
import copy
import functools
import hashlib
from pathlib import Path

import referencing
import referencing.jsonschema
import yaml
from jsonschema.exceptions import ValidationError, best_match
from openapi_schema_validator import OAS31Validator

SPEC = Path(__file__).resolve().parents[2] / "tests/fixtures/openai-openapi/openapi.yml"
SPEC_SHA256 = "a203971a0bc0cd3b903b9488e3ac40eaa161a274dfaf172c1da73eee029147a8"
BASE_URI = "urn:openai-openapi"
# A schema of our own, kept apart from OpenAI's in the same registry (see stream_completion_schema).
TEXT_CHUNK_URI = "urn:inferd:text-completion-chunk"


def _nullable_to_31(node, counter):
    """OpenAPI 3.0's `nullable: true` rewritten in 3.1's form, everywhere in `node`.

    The document says `openapi: 3.1.0`, where `nullable` no longer exists, yet some of its schemas
    still use it (e.g. `CreateChatCompletionStreamResponse.choices[].finish_reason`). A 3.1
    validator ignores unknown keywords, so it would reject the `null` those schemas mean to allow.
    `{..., nullable: true}` becomes `{anyOf: [{...}, {type: "null"}]}`, which is what 3.0 means
    by it (the annotations, e.g. `description`, stay in the first branch).
    """
    if isinstance(node, dict):
        out = {k: _nullable_to_31(v, counter) for k, v in node.items() if k != "nullable"}
        if node.get("nullable") is True:
            counter[0] += 1
            return {"anyOf": [out, {"type": "null"}]}
        return out
    if isinstance(node, list):
        return [_nullable_to_31(v, counter) for v in node]
    return node


def _stream_completion_schema(schemas):
    """The schema of one streamed `text_completion` chunk.

    `CreateCompletionResponse` says streamed and whole objects "share the same shape", but its
    `choices[].finish_reason` is a non-null enum, while every chunk before a choice's last has
    `finish_reason: null` (as OpenAI's own API sends it). This is a copy of that schema, changed
    only there: `finish_reason` also admits null. Its `$ref`s still point into OpenAI's document.
    """
    s = copy.deepcopy(schemas["CreateCompletionResponse"])
    props = s["properties"]["choices"]["items"]["properties"]
    props["finish_reason"] = {"anyOf": [props["finish_reason"], {"type": "null"}]}
    _rebase_refs(s)
    return s


def _rebase_refs(node):
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            node["$ref"] = BASE_URI + ref
        for v in node.values():
            _rebase_refs(v)
    elif isinstance(node, list):
        for v in node:
            _rebase_refs(v)


class Spec:
    def __init__(self, path=SPEC):
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if digest != SPEC_SHA256:
            raise RuntimeError(f"{path}: sha256 {digest}, pinned {SPEC_SHA256}; see its README")
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        doc = yaml.load(raw, Loader=loader)
        assert doc["openapi"].startswith("3.1"), doc["openapi"]
        self.version = doc["info"]["version"]
        counter = [0]
        doc = _nullable_to_31(doc, counter)
        self.nullable_rewrites = counter[0]
        self.schemas = doc["components"]["schemas"]
        spec_31 = referencing.jsonschema.DRAFT202012
        self.registry = referencing.Registry().with_resources([
            (BASE_URI, spec_31.create_resource(doc)),
            (TEXT_CHUNK_URI, spec_31.create_resource(_stream_completion_schema(self.schemas))),
        ])
        self._validators = {}

    def validator(self, name):
        """A validator for `#/components/schemas/<name>`, or for the text-completion chunk."""
        if name not in self._validators:
            if name == "text_completion.chunk":
                ref = TEXT_CHUNK_URI
            else:
                if name not in self.schemas:
                    raise KeyError(f"no schema {name!r} in the pinned spec")
                ref = f"{BASE_URI}#/components/schemas/{name}"
            self._validators[name] = OAS31Validator({"$ref": ref}, registry=self.registry)
        return self._validators[name]

    def errors(self, name, body):
        return list(self.validator(name).iter_errors(body))

    def validate(self, name, body, what=""):
        """Raises AssertionError naming every violation of schema `name` by `body`."""
        errs = self.errors(name, body)
        if errs:
            lines = [_describe(e) for e in sorted(errs, key=lambda e: list(e.absolute_path))]
            best = best_match(errs)
            raise AssertionError(
                f"{what or 'body'} violates OpenAI's {name} ({len(errs)} error(s); "
                f"most relevant: {_describe(best)}):\n  " + "\n  ".join(lines) + f"\nbody: {body!r}"[:4000]
            )


def _describe(e: ValidationError) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path) or "(root)"
    msg = e.message
    # anyOf failures hide the reason in their context; name the deepest one.
    if e.context:
        deepest = max(e.context, key=lambda c: len(c.absolute_path))
        sub = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in deepest.absolute_path)
        msg += f" [e.g. at {sub or '(root)'}: {deepest.message}]"
    return f"{path}: {msg}"


@functools.lru_cache(maxsize=1)
def spec() -> Spec:
    return Spec()
