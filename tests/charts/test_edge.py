"""The Istio edge as rendered: routes, JWT authentication and the authorization rules, evaluated with
Istio's matching semantics (DENY policies at the gateway; exact/prefix/suffix/{*} paths; requests are
normalised by meshConfig.pathNormalization before any rule or route sees them)."""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from urllib.parse import unquote

import pytest
import yaml

from .conftest import INLINE_JWKS_ARGS, JWKS_FIXTURE, REPO_ROOT

ISSUER = "https://emporium.local/users"
GATEWAY = {"istio": "ingressgateway"}


def normalise(path: str) -> str:
    """DECODE_AND_MERGE_SLASHES: decode %2F/%5C, merge slashes, resolve dot segments (RFC 3986)."""
    path = path.split("?", 1)[0]
    path = re.sub("%2[fF]", "/", path)
    path = re.sub("%5[cC]", "\\\\", path).replace("\\", "/")
    path = re.sub("/{2,}", "/", path)
    path = unquote(path)
    normal = posixpath.normpath(path)
    if path.endswith("/") and normal != "/":
        normal += "/"
    return normal


def path_matches(pattern: str, path: str) -> bool:
    if "{" in pattern:  # Istio path templates: {*} one segment, {**} the rest
        regex = re.escape(pattern).replace(r"\{\*\*\}", ".*").replace(r"\{\*\}", "[^/]+")
        return re.fullmatch(regex, path) is not None
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return path.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return path.endswith(pattern[1:])
    return path == pattern


@dataclass
class Request:
    method: str
    path: str
    roles: tuple[str, ...] | None = None  # None: no (valid) token
    claims: dict = field(default_factory=dict)

    @property
    def principal(self) -> str | None:
        return None if self.roles is None else f"{ISSUER}/user-1"


def _any(patterns, value, matcher=lambda p, v: p == v) -> bool:
    return any(matcher(p, value) for p in patterns)


def operation_matches(op: dict, request: Request, path: str) -> bool:
    checks = [
        ("paths", lambda: _any(op["paths"], path, path_matches)),
        ("notPaths", lambda: not _any(op["notPaths"], path, path_matches)),
        ("methods", lambda: request.method in op["methods"]),
        ("notMethods", lambda: request.method not in op["notMethods"]),
    ]
    unsupported = set(op) - {name for name, _ in checks}
    assert not unsupported, f"evaluator does not know {unsupported}"
    return all(check() for name, check in checks if name in op)


def source_matches(source: dict, request: Request) -> bool:
    principal = request.principal
    result = True
    if "requestPrincipals" in source:
        result &= principal is not None and _any(source["requestPrincipals"], principal, path_matches)
    if "notRequestPrincipals" in source:
        result &= principal is None or not _any(source["notRequestPrincipals"], principal, path_matches)
    assert set(source) <= {"requestPrincipals", "notRequestPrincipals"}
    return result


def condition_matches(cond: dict, request: Request) -> bool:
    claim = re.fullmatch(r"request\.auth\.claims\[(.+)\]", cond["key"])
    assert claim, cond
    values = set((request.claims | {"roles": list(request.roles or ())}).get(claim.group(1)) or [])
    if "values" in cond:
        return bool(values & set(cond["values"]))
    return not values & set(cond["notValues"])


def rule_matches(rule: dict, request: Request, path: str) -> bool:
    froms = rule.get("from") or []
    tos = rule.get("to") or []
    return (
        (not froms or any(source_matches(f["source"], request) for f in froms))
        and (not tos or any(operation_matches(t["operation"], request, path) for t in tos))
        and all(condition_matches(c, request) for c in rule.get("when") or [])
    )


def allowed(policies: list[dict], request: Request) -> bool:
    path = normalise(request.path)
    denies = [p for p in policies if p["spec"].get("action") == "DENY"]
    allows = [p for p in policies if p["spec"].get("action", "ALLOW") == "ALLOW"]
    if any(rule_matches(r, request, path) for p in denies for r in p["spec"]["rules"]):
        return False
    return not allows or any(rule_matches(r, request, path) for p in allows for r in p["spec"]["rules"])


def route(virtual_service: dict, path: str) -> str | None:
    path = normalise(path)
    for http in virtual_service["spec"]["http"]:
        for match in http["match"]:
            uri = match["uri"]
            if ("exact" in uri and path == uri["exact"]) or (
                "prefix" in uri and path.startswith(uri["prefix"])
            ):
                return http["route"][0]["destination"]["host"].split(".")[0]
    return None


@pytest.fixture(scope="module")
def edge(render) -> dict:
    objects = render("emporium")
    return {
        "policies": [
            o
            for o in objects
            if o["kind"] == "AuthorizationPolicy"
            and o["spec"].get("selector", {}).get("matchLabels") == GATEWAY
        ],
        "vs": next(o for o in objects if o["kind"] == "VirtualService"),
        "ra": next(o for o in objects if o["kind"] == "RequestAuthentication"),
        "objects": objects,
    }


CUSTOMER, ADMIN = ("customer",), ("admin", "customer")
PUBLIC = [
    ("POST", "/users/register"),
    ("POST", "/users/login"),
    ("POST", "/users/refresh"),
    ("POST", "/users/logout"),
    ("GET", "/products"),
    ("GET", "/products?limit=5"),
    ("GET", "/products/42"),
    ("HEAD", "/products/42"),
    ("GET", "/.well-known/jwks.json"),
    ("GET", "/.well-known/openid-configuration"),
    ("GET", "/health"),
    ("GET", "/auth/oidc/providers"),
    ("GET", "/auth/oidc/google/start"),
    ("GET", "/auth/oidc/google/callback?code=c&state=s"),
    ("POST", "/auth/oidc/token"),
]
NEEDS_TOKEN = [
    ("GET", "/users/me"),
    ("GET", "/orders"),
    ("POST", "/orders"),
    ("GET", "/orders/7"),
    ("POST", "/orders/7/cancel"),
    ("GET", "/notifications"),
    ("GET", "/notifications/3"),
    ("GET", "/ws/notifications"),
    ("POST", "/auth/oidc/google/link"),
]
ADMIN_ONLY = [
    ("POST", "/products"),
    ("PUT", "/products/42"),
    ("PATCH", "/products/42"),
    ("DELETE", "/products/42"),
    ("PATCH", "/products/42/stock"),
    ("PATCH", "/orders/7/status"),
]
# ways to spell a protected path that a naive prefix rule would miss
BYPASSES = [
    "//orders",
    "/%2Forders",
    "/orders/",
    "///orders/7",
    "/%2forders/7",
    "/products/../orders",
    "/./orders",
    "/users/register/../me",
    "/users//me",
    "/%5Corders",
]


@pytest.mark.parametrize(("method", "path"), PUBLIC)
def test_public_paths_need_no_token(edge, method, path) -> None:
    assert allowed(edge["policies"], Request(method, path))
    assert route(edge["vs"], path) is not None


@pytest.mark.parametrize(("method", "path"), NEEDS_TOKEN)
def test_protected_paths_need_a_token(edge, method, path) -> None:
    assert not allowed(edge["policies"], Request(method, path))
    assert allowed(edge["policies"], Request(method, path, roles=CUSTOMER))


@pytest.mark.parametrize(("method", "path"), ADMIN_ONLY)
def test_product_writes_need_the_admin_role(edge, method, path) -> None:
    assert not allowed(edge["policies"], Request(method, path))
    assert not allowed(edge["policies"], Request(method, path, roles=CUSTOMER))
    assert allowed(edge["policies"], Request(method, path, roles=ADMIN))


@pytest.mark.parametrize("path", BYPASSES)
def test_slashes_and_encodings_cannot_bypass_the_rules(edge, path) -> None:
    assert not allowed(edge["policies"], Request("GET", path))
    assert route(edge["vs"], path) in ("orders", "users")


def test_mesh_normalises_paths_before_the_rules() -> None:
    istiod = yaml.safe_load((REPO_ROOT / "k8s" / "istio" / "istiod-values.yaml").read_text())
    assert istiod["meshConfig"]["pathNormalization"]["normalization"] == "DECODE_AND_MERGE_SLASHES"
    # Envoy fetches the key set through the mesh: no plaintext istiod fetch against a STRICT pod
    # (the istiod chart's values are flat: env is a top-level key, a "pilot:" level would be ignored)
    assert istiod["env"]["PILOT_JWT_ENABLE_REMOTE_JWKS"] == "envoy"
    assert "pilot" not in istiod
    # the proxies are upstream Envoy: no Istio-only extensions in what istiod sends them
    assert istiod["env"]["PILOT_ENABLE_ALPN_FILTER"] == istiod["env"]["PILOT_ENABLE_METADATA_EXCHANGE"] == "false"
    assert istiod["telemetry"]["enabled"] is False


def test_internal_endpoints_are_closed_at_the_edge(edge) -> None:
    for path in ("/internal/stock/reservations", "/metrics", "/healthz", "/readyz"):
        for method in ("GET", "POST"):
            assert not allowed(edge["policies"], Request(method, path, roles=ADMIN)), path
        # no service route: only the storefront's catch-all (and the policy refuses first)
        assert route(edge["vs"], path) == "storefront", path


def test_routes_go_to_the_owning_service_without_rewrites(edge) -> None:
    expected = {
        "/users/login": "users",
        "/users/me": "users",
        "/.well-known/jwks.json": "users",
        "/health": "users",
        "/auth/oidc/google/callback": "users",
        "/auth/oidc": "storefront",  # not the users service (only /auth/oidc/...): the shop's 404 page
        "/products": "products",
        "/products/1": "products",
        "/orders": "orders",
        "/orders/1/status": "orders",
        "/notifications": "notifications",
        "/ws/notifications": "notifications",
        "/productsX": "storefront",  # the shop's "page not found", never the products API
        "/ordersfoo": "storefront",
        "/": "storefront",
        "/product/1": "storefront",
        "/live": "storefront",
        "/static/shop.css": "storefront",
    }
    for path, service in expected.items():
        assert route(edge["vs"], path) == service, path
    for http in edge["vs"]["spec"]["http"]:
        assert "rewrite" not in http
        for match in http["match"]:
            prefix = match["uri"].get("prefix")
            assert prefix is None or prefix.endswith("/"), f"bare prefix {prefix} also matches {prefix}X"


def test_request_authentication(edge) -> None:
    ra = edge["ra"]
    assert ra["metadata"]["namespace"] == "istio-system"
    assert ra["spec"]["selector"]["matchLabels"] == GATEWAY
    (rule,) = ra["spec"]["jwtRules"]
    assert rule["issuer"] == ISSUER and rule["audiences"] == ["emporium"]
    assert rule["jwksUri"] == "http://users.emporium.svc.cluster.local:8000/.well-known/jwks.json"
    assert rule["forwardOriginalToken"] is True
    assert rule["fromParams"] == ["access_token"]  # the websocket
    for policy in edge["policies"]:
        assert policy["metadata"]["namespace"] == "istio-system"


def test_inline_key_set(render) -> None:
    """auth.jwks.mode=inline: the key set is in the RequestAuthentication (no fetch by istiod or Envoy)."""
    objects = render("emporium", *INLINE_JWKS_ARGS)
    (ra,) = [o for o in objects if o["kind"] == "RequestAuthentication"]
    (rule,) = ra["spec"]["jwtRules"]
    assert json.loads(rule["jwks"]) == json.loads(JWKS_FIXTURE.read_text()) and "jwksUri" not in rule


def test_order_status_admin_rule_can_be_relaxed(render) -> None:
    policies = [
        o
        for o in render("emporium", "--set", "auth.orderStatusRequiresAdmin=false")
        if o["kind"] == "AuthorizationPolicy" and "selector" in o["spec"]
    ]
    assert allowed(policies, Request("PATCH", "/orders/7/status", roles=CUSTOMER))
    assert allowed(policies, Request("PATCH", "/orders/7/status", roles=ADMIN))
    assert allowed(policies, Request("POST", "/orders/7/cancel", roles=CUSTOMER))


def test_mesh_is_strict_and_scoped(edge) -> None:
    objects = edge["objects"]
    (peer,) = [o for o in objects if o["kind"] == "PeerAuthentication"]
    assert peer["spec"]["mtls"]["mode"] == "STRICT" and "selector" not in peer["spec"]
    (mesh,) = [o for o in objects if o["kind"] == "AuthorizationPolicy" and "selector" not in o["spec"]]
    assert mesh["spec"]["action"] == "ALLOW"
    assert mesh["spec"]["rules"][0]["from"][0]["source"]["namespaces"] == ["emporium", "istio-system"]


def test_the_storefront_is_the_last_route_and_its_websocket_has_no_timeout(edge) -> None:
    routes = edge["vs"]["spec"]["http"]
    assert routes[-1]["name"] == "storefront" and routes[-1]["match"] == [{"uri": {"prefix": "/"}}]
    live = next(r for r in routes if r["name"] == "storefront-live")
    assert live["match"] == [{"uri": {"exact": "/live"}}] and "timeout" not in live
    assert not any("corsPolicy" in r for r in routes if r["name"].startswith("storefront"))


@pytest.mark.parametrize(("method", "path"), PUBLIC + NEEDS_TOKEN + ADMIN_ONLY)
def test_preflights_need_no_token(edge, method, path) -> None:
    assert allowed(edge["policies"], Request("OPTIONS", path)), path


def test_every_deny_rule_excludes_options(edge) -> None:
    for policy in edge["policies"]:
        if policy["spec"].get("action") != "DENY":
            continue
        for rule in policy["spec"]["rules"]:
            for to in rule.get("to") or []:
                op = to["operation"]
                excluded = "OPTIONS" in op.get("notMethods", []) or (
                    "methods" in op and "OPTIONS" not in op["methods"]
                )
                assert excluded, (policy["metadata"]["name"], op)


def test_no_cors_by_default(edge) -> None:
    assert not any("corsPolicy" in r for r in edge["vs"]["spec"]["http"])


def test_local_values_allow_the_dev_servers(render) -> None:
    objects = render("emporium", "-f", str(REPO_ROOT / "k8s" / "values" / "local.yaml"))
    vs = next(o for o in objects if o["kind"] == "VirtualService")
    expected = [
        {"exact": f"http://{host}:{port}"} for host in ("localhost", "127.0.0.1") for port in (3000, 5173)
    ]
    for http in vs["spec"]["http"]:
        if http["name"].startswith("storefront"):
            assert "corsPolicy" not in http
            continue
        cors = http["corsPolicy"]
        assert sorted(cors["allowOrigins"], key=str) == sorted(expected, key=str), http["name"]
        assert "authorization" in cors["allowHeaders"] and "idempotency-key" in cors["allowHeaders"]
        assert cors["allowCredentials"] is False


def test_websocket_token_in_the_subprotocol(edge) -> None:
    (rule,) = edge["ra"]["spec"]["jwtRules"]
    assert {"name": "Sec-WebSocket-Protocol", "prefix": "bearer, "} in rule["fromHeaders"]
    assert {"name": "Authorization", "prefix": "Bearer "} in rule["fromHeaders"]


def test_access_log_has_no_query_strings() -> None:
    mesh = yaml.safe_load((REPO_ROOT / "k8s" / "istio" / "istiod-values.yaml").read_text())["meshConfig"]
    fmt = mesh["accessLogFormat"]
    assert "%REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%" in fmt
    assert "%REQ(:PATH)%" not in fmt and "PATH)%" not in fmt.replace("REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%", "")
    assert "AUTHORIZATION" not in fmt.upper() and "SEC-WEBSOCKET-PROTOCOL" not in fmt.upper()
