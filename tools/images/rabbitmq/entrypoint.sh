#!/bin/sh
# Writes the config (default user from the environment, management plugin) and runs the node.
set -eu
umask 077
cat > "$RABBITMQ_CONFIG_FILE" <<CONF
loopback_users = none
listeners.tcp.default = 5672
management.tcp.port = 15672
default_user = ${RABBITMQ_DEFAULT_USER:-guest}
default_pass = ${RABBITMQ_DEFAULT_PASS:-guest}
CONF
echo '[rabbitmq_management].' > "$RABBITMQ_ENABLED_PLUGINS_FILE"
exec rabbitmq-server "$@"
