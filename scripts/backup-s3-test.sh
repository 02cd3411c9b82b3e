#!/usr/bin/env bash
# `salus backup` against S3-compatible storage with Object Lock: moto in server
# mode (from PyPI, into a virtualenv this script creates) on a loopback port,
# reached through a small TCP proxy that the script can slow down, kill and
# restart (an S3 endpoint restarting mid-upload). Checks that
#   * every object lands with Object Lock COMPLIANCE and retain-until = now +
#     --retain-days; deleting a version within retention is refused; an
#     overwrite only adds a version (the original stays), and `backup verify`
#     names the overwritten object (exit 3);
#   * a bucket without Object Lock is refused with a hint (exit 1), and
#     accepted with --object-lock off;
#   * `backup create` completes across an endpoint restart mid-upload (retries
#     with backoff), and a create killed mid-upload is resumed by the next run,
#     which reuses what the killed one uploaded;
#   * `backup verify` (with the audit key and the host's record) passes, a
#     deleted newest manifest (an S3 delete marker) is caught as a rollback;
#   * `backup restore` from S3 gives a trail `salus audit verify` accepts, and
#     the backed-up checkpoints (`backup checkpoints`) catch a local trail rolled
#     back to an older copy (`audit verify --checkpoints`).
#   * a server with `[audit.ship]` ships its segments as they seal: every
#     object Object-Locked (COMPLIANCE, retain-until = now + audit retention),
#     a version delete refused; with the endpoint down (the proxy killed: moto
#     keeps its state) requests are still answered, the lag metric grows and
#     `/ready` warns; with the endpoint back it catches up (lag 0, no warning);
#     after a SIGTERM the shipped destination verifies, restores to a trail
#     `audit verify` accepts, and its checkpoints include the final one.
# Credentials are moto's dummy ones, in the environment only.
#
# Needs: python3 (with venv; pip reaches PyPI), cargo (the binaries are built
# unless SALUS_BIN / SALUS_TRAIL_BENCH are set), openssl, curl, and the
# default model (scripts/fetch-model.sh; SALUS_MODEL names another GGUF). Bounded by
# SALUS_BACKUP_S3_TIMEOUT seconds (default 900). SALUS_BACKUP_S3_KEEP=1 keeps the
# work directory. Exit status 0 = all checks passed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TIMEOUT="${SALUS_BACKUP_S3_TIMEOUT:-900}"
if [ -z "${SALUS_BACKUP_S3_INNER:-}" ]; then
  SALUS_BACKUP_S3_INNER=1 exec timeout --kill-after=10 "$TIMEOUT" "$0" "$@"
fi
START=$SECONDS
say() { echo "backup-s3: $*"; }
fail() { echo "FAIL backup-s3: $*" >&2; exit 1; }

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
if [ -n "${SALUS_BIN:-}" ]; then
  BIN="$SALUS_BIN"
else
  (cd "$ROOT" && cargo build --quiet --bin salus)
  BIN="$TARGET_DIR/debug/salus"
fi
if [ -n "${SALUS_TRAIL_BENCH:-}" ]; then
  SYNTH="$SALUS_TRAIL_BENCH"
else
  (cd "$ROOT" && cargo build --quiet -p salus-backup --example trail_bench)
  SYNTH="$TARGET_DIR/debug/examples/trail_bench"
fi
VENV="${SALUS_BACKUP_S3_VENV:-$TARGET_DIR/backup-s3-venv}"
if [ ! -x "$VENV/bin/moto_server" ] || ! "$VENV/bin/python" -c "import boto3, moto" 2>/dev/null; then
  say "installing moto[server] and boto3 into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]>=5,<6" "boto3>=1.34,<2"
fi
PY="$VENV/bin/python"

WORK="$(mktemp -d)"
chmod 700 "$WORK"
MOTO_PID=""
PROXY_PID=""
CREATE_PID=""
SERVER_PID=""
cleanup() {
  for p in "$SERVER_PID" "$CREATE_PID" "$PROXY_PID" "$MOTO_PID"; do
    if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then { kill -KILL "$p"; wait "$p"; } 2>/dev/null || true; fi
  done
  if [ -n "${SALUS_BACKUP_S3_KEEP:-}" ]; then echo "backup-s3: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MOTO_PORT="$(free_port)"
PROXY_PORT="$(free_port)"

# The proxy: forwards 127.0.0.1:PROXY_PORT to moto; while $WORK/slow exists,
# each forwarded chunk waits 20 ms (so an upload takes long enough to interrupt).
cat >"$WORK/proxy.py" <<'EOF'
import os, socket, sys, threading, time
listen, target, slow = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def pipe(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d:
                break
            if os.path.exists(slow):
                time.sleep(0.02)
            b.sendall(d)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", listen))
srv.listen(64)
while True:
    c, _ = srv.accept()
    try:
        u = socket.create_connection(("127.0.0.1", target))
    except OSError:
        c.close()
        continue
    threading.Thread(target=pipe, args=(c, u), daemon=True).start()
    threading.Thread(target=pipe, args=(u, c), daemon=True).start()
EOF
start_proxy() {
  "$PY" "$WORK/proxy.py" "$PROXY_PORT" "$MOTO_PORT" "$WORK/slow" >/dev/null 2>&1 &
  PROXY_PID=$!
  for _ in $(seq 1 50); do
    "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $PROXY_PORT), 0.2)" 2>/dev/null && return 0
    sleep 0.1
  done
  fail "the proxy did not come up"
}

"$VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >"$WORK/moto.log" 2>&1 &
MOTO_PID=$!
export AWS_ACCESS_KEY_ID=salus-test AWS_SECRET_ACCESS_KEY=salus-test-secret AWS_REGION=us-east-1
export AWS_ENDPOINT_URL="http://127.0.0.1:$PROXY_PORT" AWS_ALLOW_HTTP=true
S3PY="import boto3, botocore, datetime, sys
s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:$MOTO_PORT', region_name='us-east-1')"
for _ in $(seq 1 100); do
  "$PY" -c "$S3PY
s3.list_buckets()" 2>/dev/null && break
  sleep 0.2
done
start_proxy
"$PY" -c "$S3PY
s3.create_bucket(Bucket='salus-evidence', ObjectLockEnabledForBucket=True)
s3.create_bucket(Bucket='salus-plain')"
say "moto on 127.0.0.1:$MOTO_PORT (proxy :$PROXY_PORT), buckets salus-evidence (Object Lock) and salus-plain"

# A trail with many small segments (1 MiB before sealing), and the keys.
"$SYNTH" synth "$WORK/audit" "$WORK/audit.key" 6 1 >/dev/null
"$BIN" backup keygen "$WORK/backup.key" >/dev/null
KEY="file:$WORK/audit.key"
BKEY="file:$WORK/backup.key"
DEST="s3://salus-evidence/site-a"
create() { "$BIN" backup create --to "$DEST" --audit-dir "$WORK/audit" --key "$KEY" --backup-key "$BKEY" --retain-days 1 "$@"; }
# Every object under PREFIX/ has Object Lock COMPLIANCE until about now + 1 day,
# and deleting a version of one is refused; prints how many there are.
locked() {
  "$PY" - "$1" <<EOF
$S3PY
prefix = sys.argv[1] + '/'
now = datetime.datetime.now(datetime.timezone.utc)
keys = [o['Key'] for p in s3.get_paginator('list_objects_v2').paginate(Bucket='salus-evidence', Prefix=prefix) for o in p.get('Contents', [])]
assert any(k.startswith(prefix + 'manifests/') for k in keys) and any(k.startswith(prefix + 'objects/') for k in keys), keys
for k in keys:
    h = s3.head_object(Bucket='salus-evidence', Key=k)
    assert h.get('ObjectLockMode') == 'COMPLIANCE', (k, h.get('ObjectLockMode'))
    left = h['ObjectLockRetainUntilDate'] - now
    assert datetime.timedelta(hours=23) < left < datetime.timedelta(hours=25), (k, left)
victim = next(k for k in keys if k.startswith(prefix + 'objects/'))
vid = s3.head_object(Bucket='salus-evidence', Key=victim)['VersionId']
try:
    s3.delete_object(Bucket='salus-evidence', Key=victim, VersionId=vid)
    sys.exit('a version within retention was deleted')
except botocore.exceptions.ClientError as e:
    assert e.response['Error']['Code'] == 'AccessDenied', e.response['Error']
print(len(keys))
EOF
}
objects() { "$PY" -c "$S3PY
print(sum(1 for p in s3.get_paginator('list_objects_v2').paginate(Bucket='salus-evidence', Prefix='site-a/') for _ in p.get('Contents', [])))"; }

# 1. Object Lock on every object; a delete within retention refused; an overwrite adds a version.
create >"$WORK/create1.out" || fail "backup create: $(cat "$WORK/create1.out")"
say "$(cat "$WORK/create1.out")"
N="$(locked site-a)" || fail "Object Lock retention"
"$PY" - <<EOF || fail "an overwrite of a locked object"
$S3PY
victim = next(o['Key'] for o in s3.list_objects_v2(Bucket='salus-evidence', Prefix='site-a/objects/')['Contents'])
vid = s3.head_object(Bucket='salus-evidence', Key=victim)['VersionId']
new = s3.put_object(Bucket='salus-evidence', Key=victim, Body=b'forged')['VersionId']
versions = s3.list_object_versions(Bucket='salus-evidence', Prefix=victim)['Versions']
assert any(v['VersionId'] == vid for v in versions), 'the original version is gone'
open('$WORK/victim', 'w').write(victim + ' ' + new + '\n')
EOF
say "$N objects COMPLIANCE until ~now+1d; version delete refused; an overwrite only added a version"
read -r VICTIM NEWVID <"$WORK/victim"
set +e
"$BIN" backup verify "$DEST" --backup-key "$BKEY" >"$WORK/v.out" 2>"$WORK/v.err"
rc=$?
set -e
[ "$rc" -eq 3 ] && grep -q "${VICTIM#site-a/}" "$WORK/v.err" && grep -q "modified" "$WORK/v.err" \
  || fail "verify after an overwrite: exit $rc, $(cat "$WORK/v.err")"
say "backup verify names the overwritten object (exit 3)"
# The forged version carries no retention: remove it, the original is current again.
"$PY" -c "$S3PY
s3.delete_object(Bucket='salus-evidence', Key='$VICTIM', VersionId='$NEWVID')"
"$BIN" backup verify "$DEST" --backup-key "$BKEY" --key "$KEY" --audit-dir "$WORK/audit" >/dev/null \
  || fail "verify after removing the forged version"

# 2. A bucket without Object Lock.
set +e
"$BIN" backup create --to s3://salus-plain/x --audit-dir "$WORK/audit" --key "$KEY" --backup-key "$BKEY" \
  >/dev/null 2>"$WORK/plain.err"
rc=$?
set -e
[ "$rc" -eq 1 ] && grep -q "Object Lock" "$WORK/plain.err" || fail "bucket without Object Lock: exit $rc, $(cat "$WORK/plain.err")"
"$BIN" backup create --to s3://salus-plain/x --audit-dir "$WORK/audit" --key "$KEY" --backup-key "$BKEY" \
  --object-lock off >/dev/null || fail "--object-lock off"
say "a bucket without Object Lock is refused with a hint; --object-lock off writes"

# 3. The S3 endpoint restarts mid-upload: the create retries and completes.
"$SYNTH" synth "$WORK/audit" "$WORK/audit.key" 12 1 >/dev/null
touch "$WORK/slow"
BEFORE="$(objects)"
create --concurrency 2 >"$WORK/create2.out" 2>"$WORK/create2.err" &
CREATE_PID=$!
for _ in $(seq 1 100); do [ "$(objects)" -gt $((BEFORE + 3)) ] && break; sleep 0.1; done
{ kill -KILL "$PROXY_PID"; wait "$PROXY_PID"; } 2>/dev/null || true
say "endpoint down mid-upload ($(( $(objects) - BEFORE )) new objects so far)"
sleep 3
start_proxy
wait "$CREATE_PID" || fail "create across an endpoint restart: $(cat "$WORK/create2.err")"
CREATE_PID=""
say "create completed across the endpoint restart: $(cat "$WORK/create2.out")"

# 4. A create killed mid-upload; the next one reuses what it uploaded.
"$SYNTH" synth "$WORK/audit" "$WORK/audit.key" 18 1 >/dev/null
BEFORE="$(objects)"
create --concurrency 1 >/dev/null 2>&1 &
CREATE_PID=$!
for _ in $(seq 1 100); do [ "$(objects)" -gt $((BEFORE + 3)) ] && break; sleep 0.1; done
{ kill -KILL "$CREATE_PID"; wait "$CREATE_PID"; } 2>/dev/null || true
CREATE_PID=""
# The slowed proxy may still hold an upload the killed run had sent (its
# manifest, even): cut it, as a crashed host's connections are cut, so that it
# cannot land while the next run plans (which would then, rightly, refuse to
# overwrite that manifest and ask to be run again).
{ kill -KILL "$PROXY_PID"; wait "$PROXY_PID"; } 2>/dev/null || true
rm -f "$WORK/slow"
start_proxy
sleep 0.5
ORPHANS=$(( $(objects) - BEFORE ))
create >"$WORK/create3.out" || fail "create after a killed one"
NEW=$(( $(objects) - BEFORE - 1 ))   # objects this backup added, less its manifest
UPLOADED="$(sed -n 's/.*; \([0-9]*\) objects uploaded.*/\1/p' "$WORK/create3.out")"
[ "$ORPHANS" -ge 1 ] && [ -n "$UPLOADED" ] && [ "$UPLOADED" -le $((NEW - ORPHANS)) ] \
  || fail "resume: $ORPHANS objects from the killed run, $NEW new, the next run uploaded $UPLOADED"
say "a killed create left $ORPHANS+ objects; the next run uploaded $UPLOADED of the $NEW new ones and reused the rest"

# 5. Verify everything; a deleted newest manifest (a delete marker) is a rollback.
"$BIN" backup verify "$DEST" --backup-key "$BKEY" --key "$KEY" --audit-dir "$WORK/audit" >"$WORK/verify.out" \
  || fail "backup verify"
say "$(cat "$WORK/verify.out")"
NEWEST="$("$BIN" backup list "$DEST" | tail -1 | awk '{print $1}')"
MKEY="site-a/manifests/$(printf '%010d' "$NEWEST").json"
"$PY" -c "$S3PY
s3.delete_object(Bucket='salus-evidence', Key='$MKEY')"
set +e
"$BIN" backup verify "$DEST" --backup-key "$BKEY" --audit-dir "$WORK/audit" >/dev/null 2>"$WORK/rb.err"
rc=$?
set -e
[ "$rc" -eq 3 ] && grep -q "rolled back" "$WORK/rb.err" || fail "deleted newest manifest: exit $rc, $(cat "$WORK/rb.err")"
"$PY" - <<EOF || fail "the deleted manifest's version"
$S3PY
v = s3.list_object_versions(Bucket='salus-evidence', Prefix='$MKEY')
marker = v['DeleteMarkers'][0]['VersionId']
kept = s3.head_object(Bucket='salus-evidence', Key='$MKEY', VersionId=v['Versions'][0]['VersionId'])
assert kept['ObjectLockMode'] == 'COMPLIANCE', kept.get('ObjectLockMode')
s3.delete_object(Bucket='salus-evidence', Key='$MKEY', VersionId=marker)
EOF
"$BIN" backup verify "$DEST" --backup-key "$BKEY" --audit-dir "$WORK/audit" >/dev/null \
  || fail "verify after removing the delete marker"
say "a deleted newest manifest is a rollback (exit 3); its locked version was still there"

# 6. Restore from S3; the backed-up checkpoints catch a local trail rolled back.
"$BIN" backup restore "$DEST" --to "$WORK/restored" --backup-key "$BKEY" --key "$KEY" >"$WORK/restore.out" \
  || fail "backup restore"
"$BIN" audit verify --dir "$WORK/restored" --key "$KEY" >/dev/null || fail "audit verify of the restored trail"
say "$(head -1 "$WORK/restore.out")"
"$BIN" backup checkpoints "$DEST" --to "$WORK/ckpts" --backup-key "$BKEY" --key "$KEY" >/dev/null \
  || fail "backup checkpoints"
"$BIN" audit verify --dir "$WORK/restored" --key "$KEY" --checkpoints "$WORK/ckpts" >/dev/null \
  || fail "audit verify --checkpoints of the restored trail"
# An older copy of the trail (the first backup) verifies alone, not against the checkpoints.
"$BIN" backup restore "$DEST" --to "$WORK/old" --backup-key "$BKEY" \
  --at "$("$BIN" backup list "$DEST" | sed -n 2p | awk '{print $2}')" >/dev/null 2>&1 || fail "restore --at"
"$BIN" audit verify --dir "$WORK/old" --key "$KEY" >/dev/null || fail "the old copy alone"
set +e
"$BIN" audit verify --dir "$WORK/old" --key "$KEY" --checkpoints "$WORK/ckpts" >/dev/null 2>"$WORK/old.err"
rc=$?
set -e
[ "$rc" -ne 0 ] && grep -q "trail truncated" "$WORK/old.err" || fail "rolled-back copy vs checkpoints: $(cat "$WORK/old.err")"
say "restored trail verifies; a rolled-back copy fails against the backed-up checkpoints"

# 7. A server ships its trail as it grows ([audit.ship]), across an endpoint outage.
MODEL="${SALUS_MODEL:-$("$ROOT/scripts/fetch-model.sh")}"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj "/CN=localhost" \
  -addext "subjectAltName=IP:127.0.0.1" -keyout "$WORK/tls-key.pem" -out "$WORK/tls-cert.pem" 2>/dev/null
"$BIN" audit keygen "$WORK/srv.key" >/dev/null
SKEY="file:$WORK/srv.key"
IKEY="$("$BIN" keys --api-keys "$WORK/api-keys.json" create --principal ship-test --kind service --role inference \
  --role metrics 2>/dev/null)"
PORT="$(free_port)"
SHIP="s3://salus-evidence/ship"
SALUS_MODEL__ALLOW_PLAINTEXT_WEIGHTS=true SALUS_MODEL__ID=smollm2-135m \
SALUS_AUDIT__DIR="$WORK/srv-audit" SALUS_AUDIT__KEY="$SKEY" SALUS_AUDIT__RETENTION_DAYS=1 \
SALUS_AUDIT__SEGMENT_MAX_BYTES=4096 SALUS_AUDIT__CHECKPOINT_EVERY_SECS=1 \
SALUS_AUDIT__SHIP="{target = \"$SHIP\", backup_key = \"$BKEY\", min_interval_secs = 1, lag_warning_secs = 3, retry_max_backoff_secs = 1, shutdown_flush_secs = 30}" \
  "$BIN" serve --listen "127.0.0.1:$PORT" --model "$MODEL" --tls-cert "$WORK/tls-cert.pem" \
    --tls-key "$WORK/tls-key.pem" --api-keys "$WORK/api-keys.json" >"$WORK/server.out" 2>"$WORK/server.err" &
SERVER_PID=$!
api() { curl -s --cacert "$WORK/tls-cert.pem" -H "Authorization: Bearer $IKEY" "$@"; }
for _ in $(seq 1 240); do
  api -o /dev/null "https://127.0.0.1:$PORT/health" && break
  kill -0 "$SERVER_PID" 2>/dev/null || fail "the server exited: $(tail -5 "$WORK/server.err")"
  sleep 0.5
done
infer() {
  for _ in $(seq 1 "$1"); do
    code="$(api -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' \
      "https://127.0.0.1:$PORT/v1/chat/completions" \
      -d '{"model": "smollm2-135m", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}')"
    [ "$code" = 200 ] || fail "inference answered $code"
  done
}
metric() { api "https://127.0.0.1:$PORT/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
ready() { api "https://127.0.0.1:$PORT/ready"; }
sealed_count() { find "$WORK/srv-audit" -name 'seg-*.sealed' | wc -l; }
# Nothing left to ship: no lag, the newest sealed segment shipped, no warning.
caught_up() {
  [ "$(metric salus_audit_ship_lag_segments)" = 0 ] && [ "$(metric salus_audit_ship_lag_seconds)" = 0 ] \
    && [ "$(metric salus_audit_ship_shipped_segment)" -ge "$1" ] && ! ready | grep -q audit_ship_lagging
}
infer 6
SEALED="$(sealed_count)"
[ "$SEALED" -ge 2 ] || fail "only $SEALED segments sealed"
for _ in $(seq 1 120); do caught_up "$SEALED" && break; sleep 0.5; done
caught_up "$SEALED" || fail "not shipped: lag $(metric salus_audit_ship_lag_segments), $(ready)"
N="$(locked ship)" || fail "Object Lock of the shipped objects"
say "the server shipped $SEALED sealed segments as they sealed ($(metric salus_audit_ship_shipments_total) shipments, $N objects, COMPLIANCE until ~now+1d = audit.retention_days; a version delete refused)"

# The endpoint goes away: inference goes on, the lag grows, /ready warns (status unchanged).
{ kill -KILL "$PROXY_PID"; wait "$PROXY_PID"; } 2>/dev/null || true
infer 6
for _ in $(seq 1 60); do ready | grep -q audit_ship_lagging && break; sleep 0.5; done
READY="$(ready)"
echo "$READY" | grep -q '"audit_ship_lagging"' || fail "no /ready warning with the endpoint down: $READY"
echo "$READY" | grep -q '"status":"ready"' || fail "/ready status changed: $READY"
LAG="$(metric salus_audit_ship_lag_segments)"
[ "$LAG" -ge 1 ] || fail "lag metric with the endpoint down: $LAG"
say "endpoint down: requests answered, lag $LAG segments / $(metric salus_audit_ship_lag_seconds) s, /ready: $READY"
start_proxy
SEALED="$(sealed_count)"
for _ in $(seq 1 360); do caught_up "$SEALED" && break; sleep 0.5; done
caught_up "$SEALED" || fail "no catch-up: lag $(metric salus_audit_ship_lag_segments), $(ready)"
say "endpoint back: caught up (lag 0, no warning; $(metric salus_audit_ship_failures_total) failed attempts)"

# SIGTERM: the final checkpoint is shipped; the destination verifies and restores.
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || fail "the server exited non-zero: $(tail -5 "$WORK/server.err")"
SERVER_PID=""
"$BIN" backup verify "$SHIP" --backup-key "$BKEY" --key "$SKEY" --audit-dir "$WORK/srv-audit" \
  >"$WORK/ship-verify.out" || fail "backup verify of the shipped destination"
"$BIN" backup restore "$SHIP" --to "$WORK/ship-restored" --backup-key "$BKEY" --key "$SKEY" >/dev/null \
  || fail "backup restore of the shipped destination"
"$BIN" audit verify --dir "$WORK/ship-restored" --key "$SKEY" >/dev/null || fail "audit verify of the shipped trail"
"$BIN" backup checkpoints "$SHIP" --to "$WORK/ship-ckpts" --backup-key "$BKEY" --key "$SKEY" >/dev/null \
  || fail "backup checkpoints of the shipped destination"
"$BIN" audit verify --dir "$WORK/srv-audit" --key "$SKEY" --checkpoints "$WORK/ship-ckpts" >/dev/null \
  || fail "the local trail against the shipped checkpoints"
LAST="$("$PY" -c "import json; print(json.load(open('$WORK/srv-audit/checkpoint.json'))['records'])")"
[ -f "$WORK/ship-ckpts/checkpoint-$(printf '%020d' "$LAST").json" ] || fail "the final checkpoint ($LAST) was not shipped"
say "after SIGTERM: $(cat "$WORK/ship-verify.out")"
say "the shipped destination restores to a trail that verifies; the final checkpoint (seq $LAST) was shipped"

# Nothing secret in what Salus printed.
if grep -a -q -e "salus-test-secret" "$WORK"/*.out "$WORK"/*.err 2>/dev/null; then
  fail "the S3 secret appears in salus output"
fi
say "all checks passed in $((SECONDS - START)) s"
