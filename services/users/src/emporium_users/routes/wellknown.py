"""Discovery documents for token verifiers (Istio RequestAuthentication, the other services)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from ..deps import KeysDep, SettingsDep

router = APIRouter(prefix="/.well-known", tags=["well-known"])

# Verifiers cache the key set; keep it short so a published next key is seen well before it signs.
CACHE_CONTROL = "public, max-age=300"


@router.get("/jwks.json")
def jwks(keys: KeysDep, response: Response) -> dict[str, Any]:
    """Public keys only (current, next, previous), each with ``kid``, ``alg`` and ``use``."""
    response.headers["Cache-Control"] = CACHE_CONTROL
    return keys.jwks()


@router.get("/openid-configuration")
def openid_configuration(request: Request, settings: SettingsDep, response: Response) -> dict[str, Any]:
    response.headers["Cache-Control"] = CACHE_CONTROL
    jwks_uri = settings.jwks_url or str(request.url_for("jwks"))
    return {
        "issuer": settings.jwt_issuer,
        "jwks_uri": jwks_uri,
        "token_endpoint": str(request.url_for("login")),
        "response_types_supported": ["token"],
        "grant_types_supported": ["password", "refresh_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256", "RS256"],
        "token_endpoint_auth_methods_supported": ["none"],
    }
