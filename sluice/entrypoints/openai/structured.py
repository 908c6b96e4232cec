"""Structured-output request fields → `StructuredOutputsParams` (completions and chat). No torch.

Accepted, as in vLLM (at most one of them per request, else a 400):

* OpenAI's `response_format`: `{"type": "text"}` (no constraint), `{"type": "json_object"}`,
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`
  (`strict` is accepted either way: the schema is always enforced);
* vLLM's `structured_outputs` object: one of `json`, `regex`, `choice`, `grammar`,
  `structural_tag`, `json_object`, plus `disable_any_whitespace`,
  `disable_additional_properties`, `whitespace_pattern`;
* vLLM's older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`, with
  `guided_whitespace_pattern`, and `guided_decoding_backend` when it names the backend this
  server runs ("guidance", or "auto"), and `structural_tag`.

The constraint is compiled once here without a tokenizer (`check_structured_outputs`, cached),
so a malformed schema, regex or grammar is a 400 whose `param` is the field the client sent.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from sluice.errors import InvalidRequestError
from sluice.sampling_params import StructuredOutputsParams
from sluice.structured_output.config import BACKENDS
from sluice.structured_output.grammar import check_structured_outputs

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}
_OPTIONS = ("disable_any_whitespace", "disable_additional_properties", "whitespace_pattern")


class StructuredOutputFields(BaseModel):
    """The request fields read by `structured_outputs_params` (a base of the request models)."""
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    structural_tag: str | None = None


def structured_outputs_params(request: Any) -> StructuredOutputsParams | None:
    """The request's constraint (None: none asked for); raises `InvalidRequestError` naming the
    field for a conflict or a constraint that does not compile."""
    found: list[tuple[str, dict[str, Any]]] = []
    fmt = getattr(request, "response_format", None)
    if fmt is not None and fmt.type != "text":
        found.append(("response_format", _from_response_format(fmt)))
    if request.structured_outputs:
        found.append(("structured_outputs", dict(request.structured_outputs)))
    for field, kind in _GUIDED.items():
        value = getattr(request, field)
        if value is not None:
            found.append((field, {kind: value}))
    if request.structural_tag is not None:
        found.append(("structural_tag", {"structural_tag": request.structural_tag}))
    backend = request.guided_decoding_backend
    if backend is not None and backend not in BACKENDS:
        raise InvalidRequestError(
            f"guided_decoding_backend {backend!r} is not this server's backend; it runs "
            f"llguidance (send \"guidance\" or \"auto\", or leave it out).",
            param="guided_decoding_backend")
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise InvalidRequestError(f"Only one structured-output constraint may be given; got "
                                  f"{names}.", param=found[1][0])
    field, kwargs = found[0]
    if request.guided_whitespace_pattern is not None:
        kwargs.setdefault("whitespace_pattern", request.guided_whitespace_pattern)
    try:
        params = StructuredOutputsParams(**kwargs)
    except TypeError as e:   # an unknown key in the structured_outputs object
        raise InvalidRequestError(f"{field}: {e}", param=field) from None
    except InvalidRequestError as e:
        raise InvalidRequestError(str(e).replace("structured_outputs", field, 1),
                                  param=field) from None
    try:
        check_structured_outputs(params)
    except InvalidRequestError as e:
        raise InvalidRequestError(str(e), param=field) from None
    return params


def _from_response_format(fmt: Any) -> dict[str, Any]:
    if fmt.type == "json_object":
        return {"json_object": True}
    spec = fmt.json_schema
    if spec is None or spec.json_schema is None:
        raise InvalidRequestError("response_format of type json_schema needs "
                                  "json_schema.schema (a JSON schema object).",
                                  param="response_format")
    return {"json": spec.json_schema}
