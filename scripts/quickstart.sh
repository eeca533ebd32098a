#!/usr/bin/env bash
# The quickstart: starts the local services, creates two demo tables, captures them with
# pipelines/quickstart.yaml into Parquet under ./data/quickstart-lake, changes some rows, captures
# the changes, and shows what landed. Safe to re-run: it starts the demo over each time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh >/dev/null
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/sluice-target}
export PGPASSWORD=cdc
SERVICES=${SLUICE_SERVICES:-/var/tmp/sluice-services}
psql() { command psql -h 127.0.0.1 -U cdc -d cdc -v ON_ERROR_STOP=1 -q "$@"; }

echo "== building sluice"
cargo build --locked --quiet
sluice="$CARGO_TARGET_DIR/debug/sluice"

echo "== resetting the demo (tables, slot, data directory)"
psql -c "SELECT pg_drop_replication_slot('sluice_quickstart') FROM pg_replication_slots WHERE slot_name = 'sluice_quickstart'" >/dev/null
rm -rf data/quickstart data/quickstart-lake
psql <<'SQL'
DROP TABLE IF EXISTS qs_orders, qs_customers;
CREATE TABLE qs_customers (id int PRIMARY KEY, name text NOT NULL, email text, notes text);
-- Out of line and uncompressed: updates that leave `notes` alone do not send it in the WAL.
ALTER TABLE qs_customers ALTER COLUMN notes SET STORAGE EXTERNAL;
CREATE TABLE qs_orders (
  id bigserial PRIMARY KEY, customer_id int NOT NULL, amount numeric(12,2), status text,
  created_at timestamptz DEFAULT now(), tags text[], meta jsonb);
INSERT INTO qs_customers SELECT g, 'customer ' || g, 'c' || g || '@example.com', repeat('long notes ', 500)
  FROM generate_series(1, 1000) g;
INSERT INTO qs_orders (customer_id, amount, status, tags, meta)
  SELECT g % 1000 + 1, (g * 7 % 10000) / 100.0, 'new', ARRAY['web'], jsonb_build_object('n', g)
  FROM generate_series(1, 20000) g;
SQL

echo "== sluice validate"
"$sluice" validate pipelines/quickstart.yaml
echo "== sluice run --until-idle 2s  (initial snapshot)"
"$sluice" run pipelines/quickstart.yaml --until-idle 2s 2>&1 | grep -E "snapshot|stopping|error" || true

echo "== changing rows, then capturing the changes"
psql <<'SQL'
UPDATE qs_orders SET status = 'paid' WHERE id % 10 = 0;
UPDATE qs_customers SET email = 'vip' || id || '@example.com' WHERE id <= 5;  -- notes unchanged, TOASTed
DELETE FROM qs_orders WHERE id % 100 = 1;
INSERT INTO qs_orders (customer_id, amount, status) VALUES (1, 99.99, 'new');
SQL
"$sluice" run pipelines/quickstart.yaml --until-idle 2s 2>&1 | grep -E "stopping|error" || true

echo "== sluice status"
"$sluice" status pipelines/quickstart.yaml
echo "== what landed (read back with DuckDB)"
"$SERVICES/venv/bin/python" - <<'PY'
import duckdb
for table in ("public.qs_orders", "public.qs_customers"):
    rows = duckdb.sql(f"""SELECT _sluice_op, count(*) FROM read_parquet('data/quickstart-lake/{table}/*/*.parquet',
                          union_by_name=true) GROUP BY 1 ORDER BY 1""").fetchall()
    print(f"{table}: " + ", ".join(f"{op} {n}" for op, n in rows))
print(duckdb.sql("""SELECT id, email, length(notes) AS notes_len, _sluice_op, _sluice_position
                    FROM read_parquet('data/quickstart-lake/public.qs_customers/*/*.parquet')
                    WHERE id = 1 ORDER BY _sluice_position""").fetchall())
PY
echo "== done: files are under data/quickstart-lake/"
