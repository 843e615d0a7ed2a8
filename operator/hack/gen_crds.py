"""Generate charts/emporium-operator/crds/*.yaml (run: uv run python operator/hack/gen_crds.py).

One source for the five CRDs: OpenAPI schemas with descriptions (for `kubectl explain`), printer
columns, status subresource and CEL rules for immutable fields and invalid values."""

from __future__ import annotations

from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[2] / "charts" / "emporium-operator" / "crds"
GROUP = "emporium.dev"


def s(description: str, **kw) -> dict:
    return {"type": "string", "description": description, **kw}


def i(description: str, **kw) -> dict:
    return {"type": "integer", "description": description, **kw}


def b(description: str, **kw) -> dict:
    return {"type": "boolean", "description": description, **kw}


def obj(description: str, props: dict, required: list[str] | None = None, **kw) -> dict:
    out = {"type": "object", "description": description, "properties": props, **kw}
    if required:
        out["required"] = required
    return out


def arr(description: str, items: dict, **kw) -> dict:
    return {"type": "array", "description": description, "items": items, **kw}


def immutable(message: str) -> list[dict]:
    return [{"rule": "self == oldSelf", "message": message}]


NAME_RE = r"^[^\x00]+$"

SERVER_REF = obj(
    "Reference to the server object. Immutable. A server in another namespace must allow this object's "
    "namespace (its spec.allowedNamespaces), so tenants never need a copy of the admin Secret.",
    {
        "name": s("Name of the server object.", minLength=1, maxLength=253),
        "namespace": s(
            "Namespace of the server object; default: this object's namespace.", minLength=1, maxLength=63
        ),
    },
    ["name"],
    **{"x-kubernetes-validations": immutable("serverRef is immutable")},
)

ALLOWED_NAMESPACES = obj(
    "Which other namespaces may refer to this server (its own namespace always may), as Gateway API's "
    "allowedRoutes and CloudNativePG do: a list of names and/or a label selector on namespaces.",
    {
        "names": arr("Namespace names.", s("A namespace.", minLength=1, maxLength=63), maxItems=256),
        "selector": obj(
            "A label selector on namespaces.",
            {
                "matchLabels": {
                    "type": "object",
                    "description": "Labels a namespace must have.",
                    "additionalProperties": {"type": "string"},
                },
                "matchExpressions": arr(
                    "Label expressions.",
                    obj(
                        "An expression.",
                        {
                            "key": s("Label key."),
                            "operator": s("Operator.", enum=["In", "NotIn", "Exists", "DoesNotExist"]),
                            "values": arr("Values.", s("A value.")),
                        },
                        ["key", "operator"],
                    ),
                ),
            },
        ),
    },
)

SECRET_REF = obj(
    "Secret in the server object's namespace holding the administrator credentials (only the operator reads "
    "it; objects in other namespaces never see it).",
    {
        "name": s("Secret name.", minLength=1, maxLength=253),
        "usernameKey": s("Key of the user name.", default="username"),
        "passwordKey": s("Key of the password.", default="password"),
    },
    ["name"],
)

RECLAIM = s(
    "What happens on the server when this object is deleted: Retain (default) keeps it, Delete removes it "
    "(blocked, with a DeletionBlocked condition, while it is in use).",
    enum=["Retain", "Delete"],
    default="Retain",
)

CONDITIONS = arr(
    "Conditions; Ready says whether the object is provisioned and why not.",
    obj(
        "A condition.",
        {
            "type": s("Condition type: Ready, Conflict, DeletionBlocked."),
            "status": s("True, False or Unknown.", enum=["True", "False", "Unknown"]),
            "reason": s(
                "One-word reason (e.g. Provisioned, ServerUnreachable, InvalidSpec, Conflict, Forbidden, "
                "TypeMismatch, NamespaceNotAllowed)."
            ),
            "message": s("What happened and what to do about it."),
            "lastTransitionTime": s("When the status last changed.", format="date-time"),
            "observedGeneration": i("The generation the condition was computed for.", format="int64"),
        },
        ["type", "status"],
    ),
    **{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
)

COMMON_STATUS = {
    "conditions": CONDITIONS,
    "observedGeneration": i("The metadata.generation last reconciled.", format="int64"),
    "driftRepairs": i("How many out-of-band changes the drift check has repaired."),
    "lastDriftRepair": obj(
        "The last drift repair.",
        {
            "time": s("When.", format="date-time"),
            "objects": arr("What was recreated or reset.", s("Object kind.")),
        },
    ),
}

READY_COLS = [
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Reason", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].reason'},
]
AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
MESSAGE = {
    "name": "Message",
    "type": "string",
    "priority": 1,
    "jsonPath": '.status.conditions[?(@.type=="Ready")].message',
}


def crd(
    kind: str, plural: str, short: list[str], description: str, spec: dict, status: dict, columns: list
) -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "emporium"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "plural": plural,
                "singular": kind.lower(),
                "listKind": f"{kind}List",
                "shortNames": short,
                "categories": ["emporium"],
            },
            "versions": [
                {
                    "name": "v1alpha1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "API version."},
                                "kind": {"type": "string", "description": "Kind."},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": obj(
                                    "Observed state, written by the operator.", {**COMMON_STATUS, **status}
                                ),
                            },
                        }
                    },
                }
            ],
        },
    }


ROTATION = obj(
    "Password rotation: change trigger (any new value) to rotate now; interval rotates periodically.",
    {
        "trigger": s("Any string; each new value rotates the password once (e.g. a date).", maxLength=253),
        "interval": s(
            "Rotate automatically after this long, e.g. 720h, 30d, 90m.",
            pattern=r"^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$",
            maxLength=32,
        ),
    },
)

postgres_server = crd(
    "PostgresServer",
    "postgresservers",
    ["pgserver"],
    "How the operator reaches a PostgreSQL server; PostgresDatabase objects reference it.",
    obj(
        "Connection to the server.",
        {
            "host": s(
                "Host name or IP of the server (also used in generated Secrets).", minLength=1, maxLength=253
            ),
            "port": i("TCP port.", default=5432, minimum=1, maximum=65535),
            "sslMode": s(
                "libpq sslmode for the operator's and the services' connections.",
                enum=["disable", "allow", "prefer", "require", "verify-ca", "verify-full"],
                default="prefer",
            ),
            "adminDatabase": s("Database the operator connects to for administration.", default="postgres"),
            "adminSecretRef": SECRET_REF,
            "allowedNamespaces": ALLOWED_NAMESPACES,
        },
        ["host", "adminSecretRef"],
    ),
    {"version": s("Server version (SHOW server_version).")},
    [
        {"name": "Host", "type": "string", "jsonPath": ".spec.host"},
        {"name": "Version", "type": "string", "jsonPath": ".status.version"},
        *READY_COLS,
        AGE,
        MESSAGE,
    ],
)

postgres_database = crd(
    "PostgresDatabase",
    "postgresdatabases",
    ["pgdb"],
    "A database on a PostgresServer, with a login role that owns it and a connection Secret.",
    obj(
        "The database to provision.",
        {
            "serverRef": SERVER_REF,
            "databaseName": s(
                "Database name; defaults to metadata.name. Immutable.",
                minLength=1,
                maxLength=63,
                **{
                    "x-kubernetes-validations": [
                        *immutable("databaseName is immutable"),
                        {
                            "rule": "!(self in ['postgres', 'template0', 'template1'])",
                            "message": "databaseName must not be postgres, template0 or template1",
                        },
                    ]
                },
            ),
            "owner": s(
                "Login role that owns the database and its public schema; default <databaseName>_owner. "
                "Immutable. Never postgres, pg_*, the server's admin user or a role the operator did not "
                "create for this object (Ready=False, reason Forbidden).",
                minLength=1,
                maxLength=63,
                **{
                    "x-kubernetes-validations": [
                        *immutable("owner is immutable"),
                        {
                            "rule": "self != 'postgres' && self != 'public' && !self.startsWith('pg_')",
                            "message": "owner must not be postgres, public or pg_* (reserved roles)",
                        },
                    ]
                },
            ),
            "extensions": arr(
                "Extensions to install (CREATE EXTENSION IF NOT EXISTS); one removed from the list is "
                "dropped (DROP EXTENSION, no CASCADE: while objects depend on it, Ready is False with "
                "InvalidSpec).",
                s("Extension name.", minLength=1, maxLength=63),
                maxItems=32,
                **{"x-kubernetes-list-type": "set"},
            ),
            "reclaimPolicy": RECLAIM,
            "secretName": s(
                "Name of the connection Secret (keys uri, DATABASE_URL, host, port, dbname, username, "
                "password, and servicebinding.io's type, provider, database plus jdbc-uri and pgpass; "
                "annotation emporium.dev/credentials-hash); default <name>-db.",
                minLength=1,
                maxLength=253,
            ),
            "passwordRotation": ROTATION,
        },
        ["serverRef"],
        **{
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.databaseName) == has(oldSelf.databaseName)",
                    "message": "databaseName cannot be added or removed after creation",
                },
                {
                    "rule": "has(self.owner) == has(oldSelf.owner)",
                    "message": "owner cannot be added or removed",
                },
            ]
        },
    ),
    {
        "databaseName": s("The database on the server."),
        "username": s("The login role."),
        "secretName": s("The connection Secret."),
        "server": s("The PostgresServer."),
        "rotationTrigger": s("The passwordRotation.trigger last applied."),
        "passwordRotatedAt": s("When the password was last set.", format="date-time"),
        "extensions": arr(
            "Extensions the operator installed (dropped when removed from the spec).", s("Name.")
        ),
    },
    [
        {"name": "Server", "type": "string", "jsonPath": ".spec.serverRef.name"},
        {"name": "Database", "type": "string", "jsonPath": ".status.databaseName"},
        {"name": "Secret", "type": "string", "jsonPath": ".status.secretName"},
        *READY_COLS,
        AGE,
        MESSAGE,
    ],
)

rabbit_server = crd(
    "RabbitServer",
    "rabbitservers",
    ["rmqserver"],
    "How the operator reaches a RabbitMQ broker (management API) and what AMQP address services use.",
    obj(
        "Connection to the broker.",
        {
            "managementUrl": s(
                "Management API base URL, e.g. http://rabbitmq:15672.", minLength=1, pattern=r"^https?://"
            ),
            "amqpHost": s("AMQP host written into generated Secrets.", minLength=1, maxLength=253),
            "amqpPort": i("AMQP port.", default=5672, minimum=1, maximum=65535),
            "amqpTls": b("Use amqps:// in generated URIs.", default=False),
            "tls": obj(
                "TLS options for the management API.",
                {"insecureSkipVerify": b("Do not verify the server certificate.", default=False)},
            ),
            "adminSecretRef": SECRET_REF,
            "allowedNamespaces": ALLOWED_NAMESPACES,
        },
        ["managementUrl", "amqpHost", "adminSecretRef"],
    ),
    {"version": s("Broker version."), "clusterName": s("Broker cluster name.")},
    [
        {"name": "URL", "type": "string", "jsonPath": ".spec.managementUrl"},
        {"name": "Version", "type": "string", "jsonPath": ".status.version"},
        *READY_COLS,
        AGE,
        MESSAGE,
    ],
)

rabbit_vhost = crd(
    "RabbitVhost",
    "rabbitvhosts",
    ["rmqvhost"],
    "A virtual host on a RabbitServer.",
    obj(
        "The vhost.",
        {
            "serverRef": SERVER_REF,
            "name": s(
                "Vhost name; defaults to metadata.name. Immutable. A vhost the operator did not create for "
                "this object (e.g. /) is never touched (reason Forbidden).",
                minLength=1,
                maxLength=255,
                **{
                    "x-kubernetes-validations": [
                        *immutable("name is immutable"),
                        {"rule": "self != '/'", "message": "name must not be / (the default vhost)"},
                    ]
                },
            ),
            "reclaimPolicy": RECLAIM,
        },
        ["serverRef"],
        **{
            "x-kubernetes-validations": [
                {"rule": "has(self.name) == has(oldSelf.name)", "message": "name cannot be added or removed"}
            ]
        },
    ),
    {"vhost": s("The vhost on the broker.")},
    [
        {"name": "Server", "type": "string", "jsonPath": ".spec.serverRef.name"},
        {"name": "Vhost", "type": "string", "jsonPath": ".status.vhost"},
        *READY_COLS,
        AGE,
        MESSAGE,
    ],
)

ENTITY_NAME = {"minLength": 1, "maxLength": 255}
EXCHANGE = obj(
    "An exchange. Type and durability cannot change on the broker.",
    {
        "name": s(
            "Exchange name.",
            **ENTITY_NAME,
            **{
                "x-kubernetes-validations": [
                    {"rule": "!self.startsWith('amq.')", "message": "amq.* exchanges are reserved"}
                ]
            },
        ),
        "type": s(
            "Exchange type. Immutable.", enum=["direct", "fanout", "topic", "headers"], default="topic"
        ),
        "durable": b("Survives a broker restart. Immutable.", default=True),
    },
    ["name"],
    **{
        "x-kubernetes-validations": [
            {"rule": "self.type == oldSelf.type", "message": "an exchange's type is immutable"},
            {"rule": "self.durable == oldSelf.durable", "message": "an exchange's durable is immutable"},
        ]
    },
)
DEAD_LETTER_Q = obj(
    "Dead-lettering of this queue (goes into the queue's policy, so it can change).",
    {
        "exchange": s("Dead-letter exchange.", **ENTITY_NAME),
        "routingKey": s("Dead-letter routing key (default: the message's own)."),
        "strategy": s("Quorum queues only.", enum=["at-most-once", "at-least-once"]),
    },
    ["exchange"],
)
QUEUE = obj(
    "A queue. Type and durability are fixed at declaration; tunables go into an operator-owned policy.",
    {
        "name": s(
            "Queue name.",
            **ENTITY_NAME,
            **{
                "x-kubernetes-validations": [
                    {"rule": "!self.startsWith('amq.')", "message": "amq.* queues are reserved"}
                ]
            },
        ),
        "type": s("Queue type. Immutable.", enum=["quorum", "classic"], default="quorum"),
        "durable": b("Survives a broker restart (quorum queues must be durable). Immutable.", default=True),
        "deadLetter": DEAD_LETTER_Q,
        "messageTtl": {**i("Message TTL in milliseconds.", minimum=0), "nullable": True},
        "maxLength": {**i("Maximum number of messages.", minimum=0), "nullable": True},
        "maxLengthBytes": {**i("Maximum total size in bytes.", minimum=0), "nullable": True},
        "overflow": s(
            "Behaviour at the length limit.", enum=["drop-head", "reject-publish", "reject-publish-dlx"]
        ),
        "deliveryLimit": {
            **i("Quorum queues: redeliveries before dead-lettering.", minimum=0),
            "nullable": True,
        },
        "expires": {
            **i("Delete the queue after it is unused this many milliseconds.", minimum=1),
            "nullable": True,
        },
    },
    ["name"],
    **{
        "x-kubernetes-validations": [
            {
                "rule": "!has(self.type) || self.type != 'quorum' || !has(self.durable) || self.durable",
                "message": "quorum queues must be durable",
            },
            {"rule": "self.type == oldSelf.type", "message": "a queue's type is immutable"},
            {"rule": "self.durable == oldSelf.durable", "message": "a queue's durable is immutable"},
        ]
    },
)
BINDING = obj(
    "A binding from an exchange to a queue or exchange.",
    {
        "source": s("Source exchange.", **ENTITY_NAME),
        "destination": s("Destination queue or exchange.", **ENTITY_NAME),
        "destinationType": s("queue or exchange.", enum=["queue", "exchange"], default="queue"),
        "routingKey": s("Routing key (topic patterns allowed).", default=""),
    },
    ["source", "destination"],
)
PERMS = obj(
    "Permission regexes of the service user in this vhost; default: configure nothing, write the declared "
    "exchanges, read the declared queues.",
    {"configure": s("configure regex.", default="^$"), "write": s("write regex."), "read": s("read regex.")},
    ["write", "read"],
)

rabbit_topology = crd(
    "RabbitTopology",
    "rabbittopologies",
    ["rmqtopo"],
    "One service's RabbitMQ topology in a vhost: its user and permissions, exchanges, queues (with "
    "policies), "
    "bindings and a connection Secret. Entities removed from the spec are pruned.",
    obj(
        "The topology.",
        {
            "serverRef": SERVER_REF,
            "vhost": s(
                "Vhost (must exist, e.g. from a RabbitVhost). Immutable.",
                **ENTITY_NAME,
                **{"x-kubernetes-validations": immutable("vhost is immutable")},
            ),
            "reclaimPolicy": s(
                "Retain (default) keeps queues and exchanges on deletion or removal from the "
                "spec; Delete removes them (blocked while a queue holds messages).",
                enum=["Retain", "Delete"],
                default="Retain",
            ),
            "secretName": s(
                "Connection Secret name (keys uri, AMQP_URL, host, port, vhost, username, password, and "
                "servicebinding.io's type, provider, virtual-host; annotation "
                "emporium.dev/credentials-hash); default <name>-amqp.",
                minLength=1,
                maxLength=253,
            ),
            "passwordRotation": ROTATION,
            "user": obj(
                "The service's broker user.",
                {
                    "name": s(
                        "User name; default metadata.name. Immutable. Never the broker's admin user, a user "
                        "with tags or one the operator did not create for this object (reason Forbidden).",
                        **ENTITY_NAME,
                        **{
                            "x-kubernetes-validations": [
                                *immutable("user.name is immutable"),
                                {"rule": "self != 'guest'", "message": "user.name must not be guest"},
                            ]
                        },
                    ),
                    "permissions": PERMS,
                },
            ),
            "exchanges": arr(
                "Exchanges.",
                EXCHANGE,
                maxItems=100,
                **{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
            ),
            "queues": arr(
                "Queues.",
                QUEUE,
                maxItems=200,
                **{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
            ),
            "deadLetter": obj(
                "Shorthand: declares a dead-letter exchange and queue, bound with '#'.",
                {
                    "exchange": s("Dead-letter exchange name.", **ENTITY_NAME),
                    "exchangeType": s(
                        "Its type.", enum=["direct", "fanout", "topic", "headers"], default="topic"
                    ),
                    "queue": s("Dead-letter queue name.", **ENTITY_NAME),
                    "queueType": s("Its type.", enum=["quorum", "classic"], default="quorum"),
                },
                ["exchange", "queue"],
            ),
            "bindings": arr("Bindings.", BINDING, maxItems=500),
        },
        ["serverRef", "vhost"],
    ),
    {
        "vhost": s("The vhost."),
        "username": s("The broker user."),
        "secretName": s("The connection Secret."),
        "exchanges": i("Exchanges declared."),
        "queues": i("Queues declared."),
        "bindings": i("Bindings declared."),
        "retainedQueues": arr("Queues removed from the spec but kept (Retain, or not empty).", s("Queue.")),
        "rotationTrigger": s("The passwordRotation.trigger last applied."),
        "passwordRotatedAt": s("When the password was last set.", format="date-time"),
        "applied": obj(
            "What the operator declared (used for pruning).",
            {
                "exchanges": arr("Exchange names.", s("Name.")),
                "queues": arr("Queue names.", s("Name.")),
                "policies": arr("Policy names.", s("Name.")),
                "bindings": arr(
                    "Bindings.",
                    obj(
                        "Binding.",
                        {
                            "source": s("Source."),
                            "destination": s("Destination."),
                            "destinationType": s("queue or exchange."),
                            "routingKey": s("Routing key."),
                        },
                    ),
                ),
            },
        ),
    },
    [
        {"name": "Vhost", "type": "string", "jsonPath": ".spec.vhost"},
        {"name": "User", "type": "string", "jsonPath": ".status.username"},
        {"name": "Secret", "type": "string", "jsonPath": ".status.secretName"},
        {"name": "Queues", "type": "integer", "jsonPath": ".status.queues"},
        *READY_COLS,
        AGE,
        MESSAGE,
    ],
)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for doc in (postgres_server, postgres_database, rabbit_server, rabbit_vhost, rabbit_topology):
        path = OUT / f"{doc['spec']['names']['singular']}.yaml"
        header = "# Generated by operator/hack/gen_crds.py; edit the generator, not this file.\n"
        path.write_text(header + yaml.safe_dump(doc, sort_keys=False, width=120))
        print(path)


if __name__ == "__main__":
    main()
