#!/bin/sh
# Install the slmfleet device agent as a systemd service. Idempotent: run it again to upgrade; it never
# overwrites a configuration or a password that is already there.
#
#   sudo deploy/install-agent.sh --enroll https://fleet.example:8080 --enroll-token-file ./token
#   sudo deploy/install-agent.sh --device-id pump-7 --broker mqtts://fleet.example:8883 \
#        --mqtt-password-file ./pump-7.secret
#
# What it does:
#   1. a system user (default slmfleet) without a shell or a home of its own
#   2. a virtualenv in PREFIX/venv (default /opt/slmfleet/venv) with slmfleet[agent] installed
#   3. /etc/slmfleet/agent.toml (created once) and /etc/slmfleet/mqtt-password (mode 0600; empty when the
#      broker has no passwords); the unit hands the password to the agent as a systemd credential
#   4. /etc/systemd/system/slmfleet-agent.service, then daemon-reload, enable and (re)start
# With --enroll, step 3 is 'slmfleet agent enroll': the controller hands out the device id, the device's own
# broker credentials, the broker address and the signing key to pin (see the README's security section).
#
# Options:
#   --enroll URL              join the fleet at the controller URL with the token in --enroll-token-file
#                             (once: an enrolled device is kept; --device-id asks for an id)
#   --enroll-token-file F     the enrollment token ('slmfleet enrollment create')
#   --enroll-ca-file F        CA bundle that verifies the controller's HTTPS certificate
#   --device-id ID            this device's id (default: the host name)
#   --broker URL              broker URL (default mqtt://127.0.0.1:1883)
#   --mqtt-username NAME      broker user name, written to agent.toml
#   --mqtt-password-file F    copy the broker password from F (kept if one is installed already)
#   --signing-key-file F      the controller's public signing key (PEM; slmfleet up writes it as
#                             signing-key.pub.pem); replaced when it differs. Without one, deployments are refused
#   --package SPEC            what pip installs (default "slmfleet[agent]"; a wheel path or "DIR[agent]" works)
#   --prefix DIR              installation prefix (default /opt/slmfleet)
#   --user NAME               the service's user (default slmfleet)
#   --python PY               interpreter for the virtualenv (default python3; 3.11 or newer)
#   --no-venv                 do not create or update the virtualenv (it is managed otherwise)
#   --no-start                install and enable, but do not (re)start the service
#   --root-dir DIR            write every file under DIR instead of / (images, packaging, tests): users,
#                             ownership and systemctl are then only printed, never run
#   --dry-run                 print every action and change nothing
#   -h, --help                this text
set -eu

DEVICE_ID=""
DEVICE_ID_GIVEN=0
ENROLL_URL=""
ENROLL_TOKEN_FILE=""
ENROLL_CA_FILE=""
BROKER="mqtt://127.0.0.1:1883"
MQTT_USERNAME=""
PASSWORD_FILE=""
SIGNING_KEY_FILE=""
PACKAGE="slmfleet[agent]"
PREFIX="/opt/slmfleet"
SERVICE_USER="slmfleet"
PYTHON="python3"
WITH_VENV=1
START=1
ROOT=""
DRY_RUN=0

HERE=$(cd "$(dirname "$0")" && pwd)
UNIT_SOURCE="$HERE/systemd/slmfleet-agent.service"
UNIT_NAME="slmfleet-agent.service"
STATE_DIR="/var/lib/slmfleet-agent"
CONFIG_DIR="/etc/slmfleet"

usage() { sed -n '2,/^set -eu/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "install-agent: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --device-id) DEVICE_ID="${2:?--device-id needs a value}"; DEVICE_ID_GIVEN=1; shift 2 ;;
        --enroll) ENROLL_URL="${2:?--enroll needs the controller URL}"; shift 2 ;;
        --enroll-token-file) ENROLL_TOKEN_FILE="${2:?--enroll-token-file needs a value}"; shift 2 ;;
        --enroll-ca-file) ENROLL_CA_FILE="${2:?--enroll-ca-file needs a value}"; shift 2 ;;
        --broker) BROKER="${2:?--broker needs a value}"; shift 2 ;;
        --mqtt-username) MQTT_USERNAME="${2:?--mqtt-username needs a value}"; shift 2 ;;
        --mqtt-password-file) PASSWORD_FILE="${2:?--mqtt-password-file needs a value}"; shift 2 ;;
        --signing-key-file) SIGNING_KEY_FILE="${2:?--signing-key-file needs a value}"; shift 2 ;;
        --package) PACKAGE="${2:?--package needs a value}"; shift 2 ;;
        --prefix) PREFIX="${2:?--prefix needs a value}"; shift 2 ;;
        --user) SERVICE_USER="${2:?--user needs a value}"; shift 2 ;;
        --python) PYTHON="${2:?--python needs a value}"; shift 2 ;;
        --no-venv) WITH_VENV=0; shift ;;
        --no-start) START=0; shift ;;
        --root-dir) ROOT="${2:?--root-dir needs a value}"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

[ -f "$UNIT_SOURCE" ] || die "cannot find the unit file $UNIT_SOURCE"
if [ -n "$ROOT" ]; then
    ROOT=$(mkdir -p "$ROOT" && cd "$ROOT" && pwd)
fi
if [ -z "$DEVICE_ID" ]; then
    DEVICE_ID=$(hostname 2>/dev/null | tr -c 'A-Za-z0-9._:\n-' '-' | cut -c1-128)
fi
case "$DEVICE_ID" in
    ""|[!A-Za-z0-9]*|*[!A-Za-z0-9._:-]*) die "device id '$DEVICE_ID': use letters, digits and . _ : - (starting with a letter or digit)" ;;
esac
[ -z "$PASSWORD_FILE" ] || [ -r "$PASSWORD_FILE" ] || die "cannot read the password file $PASSWORD_FILE"
if [ -n "$ENROLL_URL" ]; then
    [ -n "$ENROLL_TOKEN_FILE" ] || die "--enroll needs --enroll-token-file"
    [ -r "$ENROLL_TOKEN_FILE" ] || die "cannot read the enrollment token file $ENROLL_TOKEN_FILE"
elif [ -n "$ENROLL_TOKEN_FILE" ]; then
    die "--enroll-token-file needs --enroll URL"
fi
if [ -n "$SIGNING_KEY_FILE" ]; then
    [ -r "$SIGNING_KEY_FILE" ] || die "cannot read the signing key $SIGNING_KEY_FILE"
    grep -q "BEGIN PUBLIC KEY" "$SIGNING_KEY_FILE" || die "$SIGNING_KEY_FILE is not a PEM public key (GET /api/v1/signing-key)"
fi
if [ -z "$ROOT" ] && [ "$DRY_RUN" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (or use --root-dir DIR or --dry-run)"
fi

# run CMD...: execute, or only print it (dry run); system CMD...: also only printed under --root-dir.
run() {
    if [ "$DRY_RUN" -eq 1 ]; then echo "+ $*"; else echo "+ $*"; "$@"; fi
}
system() {
    if [ -n "$ROOT" ] || [ "$DRY_RUN" -eq 1 ]; then echo "+ $* (skipped: $( [ "$DRY_RUN" -eq 1 ] && echo dry run || echo --root-dir))"; else echo "+ $*"; "$@"; fi
}
note() { echo "= $*"; }

# write_file PATH MODE: stdin to PATH (under ROOT) unless it exists with the same content.
write_file() {
    target="$ROOT$1"
    tmp=$(mktemp)
    cat > "$tmp"
    if [ -f "$target" ] && cmp -s "$tmp" "$target"; then
        note "$1 is up to date"
        rm -f "$tmp"
        return 0
    fi
    if [ "$DRY_RUN" -eq 1 ]; then
        echo "+ write $1 (mode $2)"
        rm -f "$tmp"
        return 0
    fi
    echo "+ write $1 (mode $2)"
    mkdir -p "$(dirname "$target")"
    chmod "$2" "$tmp"
    mv "$tmp" "$target"
}

# 1. the service user
if [ -z "$ROOT" ] && getent passwd "$SERVICE_USER" >/dev/null 2>&1; then
    note "user $SERVICE_USER exists"
else
    system useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
fi

# 2. the virtualenv
VENV="$PREFIX/venv"
if [ "$WITH_VENV" -eq 1 ]; then
    if [ -x "$ROOT$VENV/bin/python" ]; then
        note "virtualenv $VENV exists"
    else
        "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
            || die "$PYTHON is not Python 3.11 or newer (give one with --python)"
        run "$PYTHON" -m venv "$ROOT$VENV"
    fi
    run "$ROOT$VENV/bin/python" -m pip install --quiet --upgrade pip
    run "$ROOT$VENV/bin/python" -m pip install --quiet --upgrade "$PACKAGE"
else
    note "virtualenv left alone (--no-venv)"
fi

# 3. configuration and the broker password
if [ -n "$ENROLL_URL" ]; then
    if [ -f "$ROOT$CONFIG_DIR/agent.toml" ] && grep -q "slmfleet agent enroll" "$ROOT$CONFIG_DIR/agent.toml"; then
        note "$CONFIG_DIR/agent.toml is an enrollment already; kept as it is"
    else
        ENROLL_BIN="$ROOT$VENV/bin/slmfleet"
        if [ ! -x "$ENROLL_BIN" ]; then
            ENROLL_BIN=$(command -v slmfleet) || die "no slmfleet command to enroll with (install the virtualenv first)"
        fi
        set -- agent enroll --controller "$ENROLL_URL" --token-file "$ENROLL_TOKEN_FILE" \
            --dir "$ROOT$CONFIG_DIR" --data-dir "$STATE_DIR" --force
        if [ "$DEVICE_ID_GIVEN" -eq 1 ]; then set -- "$@" --device-id "$DEVICE_ID"; fi
        if [ -n "$ENROLL_CA_FILE" ]; then set -- "$@" --ca-file "$ENROLL_CA_FILE"; fi
        run "$ENROLL_BIN" "$@"
    fi
fi
if [ -f "$ROOT$CONFIG_DIR/agent.toml" ]; then
    note "$CONFIG_DIR/agent.toml exists; kept as it is"
else
    {
        echo "# slmfleet agent settings; every key is also a flag of 'slmfleet agent' (dashes for underscores)."
        echo "device_id = \"$DEVICE_ID\""
        echo "broker = \"$BROKER\""
        echo "data_dir = \"$STATE_DIR\""
        if [ -n "$MQTT_USERNAME" ]; then echo "mqtt_username = \"$MQTT_USERNAME\""; fi
        echo "telemetry_interval_s = 10.0"
        echo ""
        echo "# Inference inputs and outputs (uncomment what this device needs):"
        echo "# model = \"$STATE_DIR/models/my-bundle\""
        echo "# http_port = 8089                        # POST /v1/infer on 127.0.0.1 only"
        echo "# mqtt_input_topics = [\"sensors/+/window\"]"
        echo "# mqtt_input_path = \"window\""
        echo "# mqtt_input_key = \"values\""
        echo "# results = \"$STATE_DIR/results.jsonl\""
        echo "# results_mqtt = true"
        echo "# max_batch = 16"
        echo "# max_wait_ms = 5.0"
        echo "# queue_size = 256"
        echo "# threads = 0"
        echo "# model_max_rss_mib = 0"
    } | write_file "$CONFIG_DIR/agent.toml" 0640
fi
if [ -f "$ROOT$CONFIG_DIR/mqtt-password" ]; then
    note "$CONFIG_DIR/mqtt-password exists; kept as it is"
elif [ -n "$PASSWORD_FILE" ]; then
    write_file "$CONFIG_DIR/mqtt-password" 0600 < "$PASSWORD_FILE"
else
    # LoadCredential= needs the file; empty means "no password".
    : | write_file "$CONFIG_DIR/mqtt-password" 0600
fi
if [ -n "$SIGNING_KEY_FILE" ]; then
    write_file "$CONFIG_DIR/signing-key.pem" 0644 < "$SIGNING_KEY_FILE"
elif [ -f "$ROOT$CONFIG_DIR/signing-key.pem" ]; then
    note "$CONFIG_DIR/signing-key.pem exists; kept as it is"
else
    # LoadCredential= needs the file; empty means "no key pinned yet": deployments are refused.
    : | write_file "$CONFIG_DIR/signing-key.pem" 0644
fi
for credential in client.pem client.key; do
    # LoadCredential= needs the files; empty means "no client certificate" (a broker without mutual TLS).
    if [ ! -f "$ROOT$CONFIG_DIR/$credential" ]; then
        : | write_file "$CONFIG_DIR/$credential" 0600
    fi
done
system chown "root:$SERVICE_USER" "$CONFIG_DIR" "$CONFIG_DIR/agent.toml"
system chmod 0750 "$CONFIG_DIR"

# 4. the unit
sed "s#/opt/slmfleet/venv/bin/slmfleet#$VENV/bin/slmfleet#; s#^User=slmfleet#User=$SERVICE_USER#; s#^Group=slmfleet#Group=$SERVICE_USER#" \
    "$UNIT_SOURCE" | write_file "/etc/systemd/system/$UNIT_NAME" 0644
system systemctl daemon-reload
system systemctl enable "$UNIT_NAME"
if [ "$START" -eq 1 ]; then
    system systemctl restart "$UNIT_NAME"
else
    note "not started (--no-start): systemctl start $UNIT_NAME"
fi
note "done: settings in $CONFIG_DIR/agent.toml${ROOT:+ (files under $ROOT)}"
