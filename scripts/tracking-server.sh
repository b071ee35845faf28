#!/usr/bin/env bash
# A team MLflow tracking server: PostgreSQL backend store, artifacts proxied by the server
# (clients send and fetch them over HTTP; none need access to the artifact store).
#
#   scripts/tracking-server.sh [start]   run in the foreground until Ctrl-C / SIGTERM (make tracking-server)
#   scripts/tracking-server.sh stop      stop the private PostgreSQL cluster, if one was left running
#   scripts/tracking-server.sh uri       print the backend store URI it uses
#
# Without FACECAL_TRACKING_DB_URI it runs a private PostgreSQL cluster (Debian's `postgresql`
# package, installed with apt-get when missing) in $FACECAL_TRACKING_HOME/pgdata. That cluster
# listens on no TCP port, only on a Unix socket in $FACECAL_TRACKING_HOME/run, with peer
# authentication: there is no password to generate, store or leak. As root the cluster runs as
# the `postgres` user (PostgreSQL refuses root).
#
# Environment (all optional):
#   FACECAL_TRACKING_HOST       interface of the HTTP server (127.0.0.1; 0.0.0.0 = the network)
#   FACECAL_TRACKING_PORT       its port (5000)
#   FACECAL_TRACKING_WORKERS    server worker processes (2)
#   FACECAL_TRACKING_HOME       state folder (default ~/.local/share/facecal/tracking; as root
#                               /var/lib/facecal-tracking, which the postgres user can reach)
#   FACECAL_TRACKING_ARTIFACTS  artifact destination (HOME/artifacts; or s3://bucket/prefix with
#                               AWS_* credentials in the environment and boto3 installed)
#   FACECAL_TRACKING_DB_URI     an existing PostgreSQL database instead of the private cluster,
#                               e.g. postgresql://mlflow:$PGPASSWORD@db.lab:5432/mlflow (keep it in
#                               the environment: it never goes on a command line)
#   FACECAL_TRACKING_PG_PORT    port number of the private cluster's socket name (5433)
#   MLFLOW                      the mlflow executable (mlflow on PATH)
set -euo pipefail

host=${FACECAL_TRACKING_HOST:-127.0.0.1}
port=${FACECAL_TRACKING_PORT:-5000}
workers=${FACECAL_TRACKING_WORKERS:-2}
pg_port=${FACECAL_TRACKING_PG_PORT:-5433}
mlflow_bin=${MLFLOW:-mlflow}
if [ "$(id -u)" -eq 0 ]; then
  home=${FACECAL_TRACKING_HOME:-/var/lib/facecal-tracking}
else
  home=${FACECAL_TRACKING_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/facecal/tracking}
fi
artifacts=${FACECAL_TRACKING_ARTIFACTS:-$home/artifacts}
pgdata=$home/pgdata
run=$home/run
db=mlflow
db_user=$(id -un)

say() { echo "tracking-server: $*" >&2; }
die() { say "$*"; exit 2; }

# PostgreSQL's tools: Debian keeps them in /usr/lib/postgresql/<major>/bin, off PATH.
pg_bin() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
  return 1
}

install_postgres() {
  local sudo_=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "PostgreSQL is not installed and there is no sudo: apt-get install postgresql"
    sudo_="sudo -n"
  fi
  say "installing Debian's postgresql package"
  $sudo_ apt-get update -qq && $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends postgresql >/dev/null || die "apt-get install postgresql failed"
}

# Run a PostgreSQL tool as the cluster's owner.
as_owner() {
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root needs the 'postgres' user (Debian's postgresql package creates it)"
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

# SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; name the driver we install (psycopg2).
backend_uri() {
  if [ -n "${FACECAL_TRACKING_DB_URI:-}" ]; then
    echo "$FACECAL_TRACKING_DB_URI" | sed 's|^postgres\(ql\)\{0,1\}://|postgresql+psycopg2://|'
  else
    echo "postgresql+psycopg2://$db_user@/$db?host=$run&port=$pg_port"
  fi
}

start_postgres() {
  local bin
  bin=$(pg_bin) || { install_postgres; bin=$(pg_bin) || die "no initdb after installing postgresql"; }
  # The socket path must fit in sun_path (107 bytes).
  [ ${#run} -le 90 ] || die "FACECAL_TRACKING_HOME is too long for a Unix socket path: $home"
  mkdir -p "$home" "$run"
  if [ "$(id -u)" -eq 0 ]; then
    mkdir -p "$pgdata"
    chown postgres:postgres "$pgdata" "$run"
    chmod 700 "$pgdata"
    as_owner test -x "$home" || die "the postgres user cannot enter $home (set FACECAL_TRACKING_HOME to a folder it can reach)"
  fi
  if [ ! -s "$pgdata/PG_VERSION" ]; then
    say "creating a PostgreSQL cluster in $pgdata"
    as_owner "$bin/initdb" -D "$pgdata" -U postgres -E UTF8 --locale=C.UTF-8 \
      --auth-local=peer --auth-host=reject >"$home/initdb.log" 2>&1 \
      || { cat "$home/initdb.log" >&2; die "initdb failed"; }
    # No TCP listener at all: only the Unix socket under $run.
    echo "listen_addresses = ''" >>"$pgdata/postgresql.conf"
  fi
  if ! as_owner "$bin/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; then
    as_owner "$bin/pg_ctl" -D "$pgdata" -l "$pgdata/server.log" -w -t 60 \
      -o "-p $pg_port -k $run" start >/dev/null \
      || { tail -n 30 "$pgdata/server.log" >&2; die "PostgreSQL did not start"; }
  fi
  local psql=("$bin/psql" -h "$run" -p "$pg_port" -d postgres -v ON_ERROR_STOP=1 -qtA)
  if [ -z "$(as_owner "${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = '$db_user'")" ]; then
    as_owner "$bin/createuser" -h "$run" -p "$pg_port" "$db_user"
  fi
  if [ -z "$(as_owner "${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]; then
    as_owner "$bin/createdb" -h "$run" -p "$pg_port" -O "$db_user" "$db"
  fi
  say "PostgreSQL $(basename "$(dirname "$bin")") on $run/.s.PGSQL.$pg_port, database '$db' owned by '$db_user'"
}

stop_postgres() {
  local bin
  bin=$(pg_bin) || return 0
  [ -s "$pgdata/PG_VERSION" ] || return 0
  if as_owner "$bin/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; then
    as_owner "$bin/pg_ctl" -D "$pgdata" -m fast -w stop >/dev/null && say "PostgreSQL stopped"
  fi
}

start() {
  command -v "$mlflow_bin" >/dev/null 2>&1 || die "'$mlflow_bin' not found (activate .venv or use make tracking-server)"
  # The driver that mlflow's SQLAlchemy store needs for postgresql:// URIs.
  local py
  py=$(head -n 1 "$(command -v "$mlflow_bin")" | sed -n 's/^#!//p')
  if [ -n "$py" ] && ! "$py" -c "import psycopg2" 2>/dev/null; then
    die "mlflow's Python ($py) has no psycopg2: pip install psycopg2-binary (in the test extras)"
  fi
  local own_db=0
  if [ -z "${FACECAL_TRACKING_DB_URI:-}" ]; then
    start_postgres
    own_db=1
  fi
  case "$artifacts" in *://*) ;; *) mkdir -p "$artifacts" ;; esac
  export MLFLOW_BACKEND_STORE_URI
  MLFLOW_BACKEND_STORE_URI=$(backend_uri)
  export MLFLOW_DISABLE_TELEMETRY=true
  # MLflow 3's job runner (GenAI evaluation jobs: seven more processes) is nothing facecal uses.
  export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
  say "MLflow on http://$host:$port (artifacts: $artifacts)"
  "$mlflow_bin" server --host "$host" --port "$port" --workers "$workers" \
    --serve-artifacts --artifacts-destination "$artifacts" &
  local pid=$!
  # SIGTERM/Ctrl-C stop the server first, then the database it writes to.
  stopping=0
  trap 'stopping=1; kill -TERM "$pid" 2>/dev/null || true' INT TERM
  local rc=0
  wait "$pid" || rc=$?
  # A trapped signal interrupts `wait`; wait again for the server to finish shutting down.
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
  if [ "$own_db" -eq 1 ]; then stop_postgres; fi
  # Stopped on request: a clean exit. Otherwise mlflow's own status.
  if [ "$stopping" -eq 1 ]; then return 0; fi
  return "$rc"
}

case "${1:-start}" in
  start) start ;;
  stop) stop_postgres ;;
  uri) backend_uri ;;
  *) die "usage: $0 [start|stop|uri]" ;;
esac
