"""Serialise a response model once.

A route that returns a pydantic model has it validated again against ``response_model`` and then encoded
by FastAPI; returning :func:`model_response` skips that second pass (pydantic-core writes the JSON bytes
directly). Keep ``response_model=`` on the route for the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import Response
from pydantic import BaseModel, TypeAdapter


def model_response(
    model: BaseModel, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        model.model_dump_json(), status_code=status_code, headers=headers, media_type="application/json"
    )


def adapter_response(
    adapter: TypeAdapter, value: object, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """The same for a non-model body (a list of models, say)."""
    return Response(
        adapter.dump_json(value), status_code=status_code, headers=headers, media_type="application/json"
    )
