#!/usr/bin/env bash
# Installs (Debian, PyPI and crates.io packages only) and starts the real servers that sluice's
# tests, quickstart and benchmarks talk to. Idempotent: re-running it starts only what is down.
#
#   PostgreSQL 15   127.0.0.1:5432   wal_level=logical, TLS with a local CA, role/db cdc/cdc (password cdc)
#   S3 API          127.0.0.1:9000   s3s-fs 0.14.1 (crates.io), access key test / secret testtest
#   Kafka API       127.0.0.1:9092   noida-db 0.2.3 (PyPI)
#   MongoDB API     127.0.0.1:27017  nx-27017 0.8.1 (PyPI), patched so the Rust driver can watch()
#   Tools           kcat, pg_recvlogical, a Python venv with pyarrow and duckdb (independent readers)
#
# Environment: SLUICE_SERVICES (state directory, default /var/tmp/sluice-services),
#              SLUICE_SERVICES_SKIP_APT=1 to skip apt-get when the packages are known to be present.
set -euo pipefail
ROOT=${SLUICE_SERVICES:-/var/tmp/sluice-services}
mkdir -p "$ROOT"/{logs,data,pids,tls}
# Servers inherit this directory; the caller's (a test's temporary clone, say) may be deleted
# while they run, and s3s-fs resolves paths through its working directory.
cd "$ROOT"
export DEBIAN_FRONTEND=noninteractive
started=$(date +%s)
log() { echo "[services +$(( $(date +%s) - started ))s] $*"; }

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
await_port() { # port seconds
  local deadline=$(( $(date +%s) + $2 ))
  until listening "$1"; do
    if [ "$(date +%s)" -ge "$deadline" ]; then echo "port $1 did not open within $2 s" >&2; return 1; fi
    sleep 0.2
  done
}
# Starts a server in the background unless something already listens on its port.
spawn() { # name port command...
  local name=$1 port=$2; shift 2
  if listening "$port"; then log "$name already listening on $port"; return 0; fi
  nohup "$@" >"$ROOT/logs/$name.log" 2>&1 &
  echo $! >"$ROOT/pids/$name.pid"
  await_port "$port" 90 || { tail -n 30 "$ROOT/logs/$name.log" >&2; return 1; }
  log "$name pid $(cat "$ROOT/pids/$name.pid") on 127.0.0.1:$port"
}

# ------------------------------------------------------------------ packages
need_apt=0
for pkg in postgresql-15 postgresql-client-15 kcat cmake libcurl4-openssl-dev pkg-config libssl-dev openssl protobuf-compiler; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt=1
done
if [ "$need_apt" = 1 ] && [ "${SLUICE_SERVICES_SKIP_APT:-0}" != 1 ]; then
  log "apt-get install"
  apt-get update -qq
  apt-get install -y -qq postgresql-15 postgresql-client-15 kcat cmake libcurl4-openssl-dev \
    pkg-config libssl-dev openssl protobuf-compiler >/dev/null
fi

if [ ! -x "$ROOT/venv/bin/python" ]; then python3 -m venv "$ROOT/venv"; fi
if ! "$ROOT/venv/bin/python" -c 'import pyarrow, duckdb, noida_db, nx_27017, pymongo, boto3' 2>/dev/null; then
  log "pip install"
  "$ROOT/venv/bin/pip" install -q --disable-pip-version-check \
    pyarrow duckdb noida-db==0.2.3 nx-27017==0.8.1 pymongo boto3
fi
# nx-27017 0.8.1 answers with a plain int cursor id and a datetime clusterTime; the Rust driver
# needs an Int64 and a BSON Timestamp before it will open a change stream.
NX=$("$ROOT/venv/bin/python" -c 'import nx_27017,os;print(os.path.dirname(nx_27017.__file__))')
sed -i 's/"id": stream\._id,/"id": __import__("bson").int64.Int64(stream._id),/' "$NX/handler.py"
sed -i 's/            "clusterTime": now,/            "clusterTime": __import__("bson").timestamp.Timestamp(int(now.timestamp()), 1),/' "$NX/changestream.py"

S3S=$ROOT/cargo/bin/s3s-fs
if [ ! -x "$S3S" ]; then
  log "cargo install s3s-fs 0.14.1 (about 3 minutes on 2 cores)"
  cargo install -q s3s-fs@0.14.1 --locked --features binary --root "$ROOT/cargo"
fi

# ------------------------------------------------------------------ TLS material for PostgreSQL
# A local CA and a server certificate for 127.0.0.1/localhost, so tests can exercise verify-full.
if [ ! -f "$ROOT/tls/server.key" ]; then
  log "tls certificates"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=sluice test CA" \
    -keyout "$ROOT/tls/ca.key" -out "$ROOT/tls/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$ROOT/tls/server.key" -out "$ROOT/tls/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$ROOT/tls/san.ext"
  openssl x509 -req -in "$ROOT/tls/server.csr" -CA "$ROOT/tls/ca.crt" -CAkey "$ROOT/tls/ca.key" \
    -CAcreateserial -days 3650 -extfile "$ROOT/tls/san.ext" -out "$ROOT/tls/server.crt" 2>/dev/null
fi
PGTLS=/etc/postgresql/15/main/sluice-tls
mkdir -p "$PGTLS"
cp "$ROOT/tls/server.crt" "$ROOT/tls/server.key" "$PGTLS/"
chown -R postgres:postgres "$PGTLS"; chmod 600 "$PGTLS/server.key"
chmod 755 "$ROOT" "$ROOT/tls"; chmod 644 "$ROOT/tls/ca.crt"

# ------------------------------------------------------------------ PostgreSQL
log "postgresql"
pg_lsclusters -h | grep -q '^15 *main' || pg_createcluster 15 main --port 5432
CONF=/etc/postgresql/15/main/conf.d/sluice.conf
cat >"$CONF.new" <<CONF
wal_level = logical
max_replication_slots = 64
max_wal_senders = 64
max_connections = 200
# Stream transactions over 64 kB to sluice while in progress (pgoutput protocol v2), so the
# tests exercise that path with small transactions.
logical_decoding_work_mem = 64kB
listen_addresses = '127.0.0.1'
port = 5432
ssl = on
ssl_cert_file = '$PGTLS/server.crt'
ssl_key_file = '$PGTLS/server.key'
CONF
# 15.19 and later accept only listed output plugins; older minors reject the unknown setting.
if /usr/lib/postgresql/15/bin/postgres --describe-config 2>/dev/null | awk '$1=="output_plugin_libraries"{f=1} END{exit !f}'; then
  echo "output_plugin_libraries = 'pgoutput, test_decoding'" >>"$CONF.new"
fi
changed=0
cmp -s "$CONF.new" "$CONF" || { mv "$CONF.new" "$CONF"; changed=1; }
rm -f "$CONF.new"
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  pg_ctlcluster 15 main start
elif [ "$changed" = 1 ] || [ "$(su postgres -c "psql -Atc 'show wal_level'")" != logical ]; then
  pg_ctlcluster 15 main restart
fi
await_port 5432 60
su postgres -c "psql -v ON_ERROR_STOP=1 -q" <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cdc') THEN
    CREATE ROLE cdc LOGIN REPLICATION SUPERUSER PASSWORD 'cdc';
  END IF;
END $$;
SELECT 'CREATE DATABASE cdc OWNER cdc' WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'cdc')\gexec
SQL

# ------------------------------------------------------------------ S3, Kafka, MongoDB
mkdir -p "$ROOT/data/s3" "$ROOT/data/mongo"
spawn s3 9000 "$S3S" --host 127.0.0.1 --port 9000 --access-key test --secret-key testtest "$ROOT/data/s3"
NOIDA=$("$ROOT/venv/bin/python" -c 'import noida_db,os;print(os.path.join(os.path.dirname(noida_db.__file__),"noida-db"))')
spawn kafka 9092 "$NOIDA" start --data-dir "$ROOT/data/noida" --only kafka --kafka-port 9092
spawn mongo 27017 "$ROOT/venv/bin/nx-27017" --host 127.0.0.1 -p 27017 --data-dir "$ROOT/data/mongo" \
  --log-file "$ROOT/logs/nx-27017-internal.log" --pid-file "$ROOT/pids/nx-27017-internal.pid"

# ------------------------------------------------------------------ smoke checks
PGPASSWORD=cdc psql -h 127.0.0.1 -U cdc -d cdc -Atc \
  "select 'postgres ' || current_setting('server_version') || ', wal_level=' || current_setting('wal_level')"
"$ROOT/venv/bin/python" - <<'PY'
import boto3, pymongo
s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:9000", aws_access_key_id="test",
                  aws_secret_access_key="testtest", region_name="us-east-1")
s3.list_buckets()
pymongo.MongoClient("mongodb://127.0.0.1:27017/?directConnection=true", serverSelectionTimeoutMS=5000).admin.command("ping")
print("s3 and mongodb answer")
PY
kcat -b 127.0.0.1:9092 -L -m 10 >/dev/null && echo "kafka answers"
log "ready (state in $ROOT)"
