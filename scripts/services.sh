#!/usr/bin/env bash
# Starts the services the tests talk to, on 127.0.0.1 only, and stops them
# when the calling shell exits. Source it.
#   PostgreSQL: DATABASE_URL when set; otherwise a throwaway cluster made with
#               initdb/pg_ctl in a temporary directory (run as the postgres
#               user when we are root, as PostgreSQL refuses root), with TLS
#               on from a CA made here (WEIGHTGEN_TEST_PG_CA, for the
#               sslmode=verify-full test; plain connections still work).
#   S3:         SeaweedFS (`weed mini`, from scripts/tools.sh) with a fresh
#               data directory and bucket; exports WEIGHTGEN_TEST_S3_URL and
#               the AWS_* settings object_store reads.
# Each test makes its own database and bucket prefix inside these.

weightgen_free_port() {
    # A free port p with p + 10000 also free (SeaweedFS puts gRPC there).
    python3 - <<'PY'
import random, socket
def free(p):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p)); return True
        except OSError:
            return False
while True:
    p = random.randrange(15000, 50000)
    if free(p) and free(p + 10000):
        print(p); break
PY
}

weightgen_services() {
    local step="[services]"
    local dir
    dir=$(mktemp -d "${TMPDIR:-/tmp}/weightgen-services.XXXXXX")
    chmod 755 "$dir"
    WEIGHTGEN_SERVICES_DIR=$dir
    WEIGHTGEN_SERVICES_PIDS=""
    trap weightgen_services_stop EXIT

    if [ -n "${DATABASE_URL:-}" ]; then
        echo "$step PostgreSQL: using DATABASE_URL"
    else
        command -v initdb >/dev/null || { echo "$step initdb not found and DATABASE_URL unset" >&2; return 1; }
        local port as_pg=()
        port=$(weightgen_free_port)
        mkdir -p "$dir/pg"
        if [ "$(id -u)" = 0 ]; then
            chown postgres "$dir/pg"
            as_pg=(runuser -u postgres --)
        fi
        "${as_pg[@]}" initdb -D "$dir/pg/data" -U postgres --auth=trust >"$dir/pg/initdb.log" 2>&1 || {
            cat "$dir/pg/initdb.log" >&2
            return 1
        }
        local tls="$dir/pg/tls"
        mkdir -p "$tls"
        openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=weightgen test PostgreSQL CA" \
            -keyout "$tls/ca.key" -out "$tls/ca.pem" >/dev/null 2>&1 &&
            openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
                -keyout "$tls/server.key" -out "$tls/server.csr" >/dev/null 2>&1 &&
            printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$tls/ext" &&
            openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" \
                -CAcreateserial -days 2 -extfile "$tls/ext" -out "$tls/server.pem" >/dev/null 2>&1 || {
            echo "$step openssl could not make the test PostgreSQL certificates" >&2
            return 1
        }
        chmod 600 "$tls/server.key"
        [ "$(id -u)" = 0 ] && chown postgres "$tls/server.key" "$tls/server.pem"
        "${as_pg[@]}" pg_ctl -D "$dir/pg/data" -l "$dir/pg/server.log" -w \
            -o "-p $port -k $dir/pg -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off -c ssl=on -c ssl_cert_file=$tls/server.pem -c ssl_key_file=$tls/server.key" \
            start >/dev/null || { cat "$dir/pg/server.log" >&2; return 1; }
        export WEIGHTGEN_TEST_PG_CA="$tls/ca.pem"
        WEIGHTGEN_PG_CTL=("${as_pg[@]}" pg_ctl -D "$dir/pg/data" -m fast stop)
        export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
        echo "$step PostgreSQL: throwaway cluster on 127.0.0.1:$port (TLS on, CA $WEIGHTGEN_TEST_PG_CA)"
    fi

    local weed="${WEIGHTGEN_TOOLS_BIN:?source scripts/tools.sh first}/weed"
    local s3 master volume filer admin
    s3=$(weightgen_free_port); master=$(weightgen_free_port); volume=$(weightgen_free_port)
    filer=$(weightgen_free_port); admin=$(weightgen_free_port)
    mkdir -p "$dir/s3"
    export AWS_ACCESS_KEY_ID=weightgen-test AWS_SECRET_ACCESS_KEY=weightgen-test-secret
    (cd "$dir/s3" && exec "$weed" mini -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$dir/s3" \
        -s3.port="$s3" -master.port="$master" -volume.port="$volume" -filer.port="$filer" \
        -admin.port="$admin" -admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 \
        -bucket=weightgen-test >"$dir/s3/weed.log" 2>&1) &
    WEIGHTGEN_SERVICES_PIDS="$WEIGHTGEN_SERVICES_PIDS $!"
    local waited=0
    until curl -s -o /dev/null "http://127.0.0.1:$s3/" && grep -q "S3 Endpoint" "$dir/s3/weed.log"; do
        sleep 1
        waited=$((waited + 1))
        if [ $waited -ge 90 ]; then
            echo "$step SeaweedFS did not start in 90 s:" >&2
            tail -20 "$dir/s3/weed.log" >&2
            return 1
        fi
    done
    export AWS_ENDPOINT="http://127.0.0.1:$s3" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1
    export WEIGHTGEN_TEST_S3_URL="s3://weightgen-test"
    echo "$step S3: SeaweedFS on 127.0.0.1:$s3 (bucket weightgen-test, ready in ${waited} s)"
}

weightgen_services_stop() {
    local pid
    for pid in $WEIGHTGEN_SERVICES_PIDS; do
        kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    done
    if [ -n "${WEIGHTGEN_PG_CTL+x}" ]; then
        "${WEIGHTGEN_PG_CTL[@]}" >/dev/null 2>&1 || true
    fi
    [ -n "${WEIGHTGEN_SERVICES_DIR:-}" ] && rm -rf "$WEIGHTGEN_SERVICES_DIR"
}

weightgen_services
