#!/usr/bin/env bash
# End-to-end test of [audit.forward] against a real syslog collector.
#
# Starts rsyslog (imtcp over TLS with the gtls driver, writing each raw
# message to a file) on a free loopback port with its own config, pid file and
# work directory (never the system service), then `salus serve` forwarding its
# audit trail there. Sends chat requests whose prompts carry a random canary,
# kills the collector (SIGKILL) mid-stream, sends more requests (the lag is a
# /ready warning, /ready stays 200), restarts the collector, waits until the
# forwarder has caught up, stops Salus, and checks that
#   * every seq of the trail, from 1 to its last record (`salus audit query`),
#     arrived in order, with the trail's event id; a seq seen twice only as
#     one contiguous re-send of at most one batch (at least once);
#   * every message is RFC 5424 with the salus@32473 structured data;
#   * the canary appears nowhere in what the collector received.
#
# Needs: rsyslogd with the gtls driver (installed with apt-get when missing and
# running as root: Debian packages rsyslog, rsyslog-gnutls), openssl, curl,
# python3, cargo (the binary is built if SALUS_BIN is unset). Bounded by
# SALUS_SIEM_TIMEOUT seconds (default 300). SALUS_SIEM_KEEP=1 keeps the work
# directory (certificates, rsyslog's file, the trail) for a look afterwards.
# Exit status 0 = all checks passed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TIMEOUT="${SALUS_SIEM_TIMEOUT:-300}"
if [ -z "${SALUS_SIEM_INNER:-}" ]; then
  SALUS_SIEM_INNER=1 exec timeout --kill-after=10 "$TIMEOUT" "$0" "$@"
fi
START=$SECONDS
say() { echo "siem-forward: $*"; }
fail() { echo "FAIL siem-forward: $*" >&2; exit 1; }

# The collector: rsyslogd and its TLS driver.
gtls_present() {
  local d
  for d in /usr/lib/*/rsyslog /usr/lib/rsyslog /usr/lib64/rsyslog; do
    [ -f "$d/lmnsd_gtls.so" ] && return 0
  done
  return 1
}
RSYSLOGD="$(command -v rsyslogd || echo /usr/sbin/rsyslogd)"
if [ ! -x "$RSYSLOGD" ] || ! gtls_present; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    fail "needs rsyslogd with the gtls driver (apt-get install rsyslog rsyslog-gnutls)"
  fi
  say "installing rsyslog and rsyslog-gnutls"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rsyslog rsyslog-gnutls >/dev/null
  RSYSLOGD="$(command -v rsyslogd || echo /usr/sbin/rsyslogd)"
fi

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
if [ -n "${SALUS_BIN:-}" ]; then
  BIN="$SALUS_BIN"
else
  (cd "$ROOT" && cargo build --quiet --bin salus)
  BIN="$TARGET_DIR/debug/salus"
fi
MODEL="${SALUS_MODEL:-$("$ROOT/scripts/fetch-model.sh")}"

WORK="$(mktemp -d)"
chmod 700 "$WORK"
SERVER_PID="" RSYSLOG_PID="" LOAD_PID=""
stop_pid() { # pid: TERM, then KILL after 5 s
  if [ -n "$1" ] && kill -0 "$1" 2>/dev/null; then
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
  fi
}
cleanup() {
  stop_pid "$LOAD_PID"
  stop_pid "$SERVER_PID"
  stop_pid "$RSYSLOG_PID"
  if [ -n "${SALUS_SIEM_KEEP:-}" ]; then echo "siem-forward: kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }

# A CA and the collector's certificate for 127.0.0.1.
# shellcheck source=scripts/lib/test-pki.sh
. "$ROOT/scripts/lib/test-pki.sh"
test_pki "$WORK" collector salus-siem-test-ca

SYSLOG_PORT="$(free_port)"
mkdir -p "$WORK/rsyslog"
cat >"$WORK/rsyslog.conf" <<EOF
global(workDirectory="$WORK/rsyslog"
       defaultNetstreamDriver="gtls"
       defaultNetstreamDriverCAFile="$WORK/ca.pem"
       defaultNetstreamDriverCertFile="$WORK/collector.pem"
       defaultNetstreamDriverKeyFile="$WORK/collector-key.pem")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")
template(name="raw" type="string" string="%rawmsg%\n")
ruleset(name="siem") {
  action(type="omfile" file="$WORK/received.log" template="raw")
}
input(type="imtcp" port="$SYSLOG_PORT" address="127.0.0.1" ruleset="siem")
EOF
"$RSYSLOGD" -N1 -f "$WORK/rsyslog.conf" >"$WORK/rsyslog-check.out" 2>&1 || { cat "$WORK/rsyslog-check.out" >&2; fail "rsyslog config"; }
start_collector() {
  rm -f "$WORK/rsyslog.pid"
  "$RSYSLOGD" -n -f "$WORK/rsyslog.conf" -i "$WORK/rsyslog.pid" >>"$WORK/rsyslog.out" 2>&1 &
  RSYSLOG_PID=$!
  for _ in $(seq 1 100); do
    if echo | timeout 3 openssl s_client -connect "127.0.0.1:$SYSLOG_PORT" -CAfile "$WORK/ca.pem" \
         -verify_return_error >/dev/null 2>&1; then
      return 0
    fi
    kill -0 "$RSYSLOG_PID" 2>/dev/null || { cat "$WORK/rsyslog.out" >&2; fail "rsyslogd exited"; }
    sleep 0.1
  done
  fail "rsyslogd does not accept TLS connections on port $SYSLOG_PORT"
}
start_collector
say "rsyslogd (pid $RSYSLOG_PID) on 127.0.0.1:$SYSLOG_PORT over TLS"

# Salus, as scripts/e2e.sh starts it, forwarding its trail to the collector.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
chmod 600 "$WORK/key.pem"
KEYS="$WORK/api-keys.json"
KEY="$("$BIN" keys --api-keys "$KEYS" create --principal siem-client --kind service --role inference 2>/dev/null)"
"$BIN" audit keygen "$WORK/audit.key" >/dev/null
PORT="$(free_port)"
METRICS_PORT="$(free_port)"
BATCH=4
SALUS_MODEL__ALLOW_PLAINTEXT_WEIGHTS=true SALUS_MODEL__ID=smollm2-135m SALUS_LOGGING__FORMAT=json \
SALUS_SERVER__METRICS_LISTEN="127.0.0.1:$METRICS_PORT" \
SALUS_AUDIT__DIR="$WORK/audit" SALUS_AUDIT__KEY="file:$WORK/audit.key" \
SALUS_AUDIT__FORWARD="{target = \"127.0.0.1:$SYSLOG_PORT\", ca_file = \"$WORK/ca.pem\", batch_records = $BATCH, lag_warning_records = 3, reconnect_max_backoff_secs = 1}" \
  "$BIN" serve --listen "127.0.0.1:$PORT" --model "$MODEL" \
    --tls-cert "$WORK/cert.pem" --tls-key "$WORK/key.pem" --api-keys "$KEYS" \
    >"$WORK/server.out" 2>"$WORK/server.err" &
SERVER_PID=$!
for _ in $(seq 1 120); do
  if curl -s --cacert "$WORK/cert.pem" "https://127.0.0.1:$PORT/health" >/dev/null 2>&1; then break; fi
  kill -0 "$SERVER_PID" 2>/dev/null || { tail -20 "$WORK/server.err" >&2; fail "salus exited during start-up"; }
  sleep 0.5
done
say "salus (pid $SERVER_PID) serving on 127.0.0.1:$PORT"

metric() { # name -> value
  curl -s "http://127.0.0.1:$METRICS_PORT/metrics" | awk -v n="$1" '$1 == n { print $2 }'
}
CANARY="siem-canary-$(openssl rand -hex 8)"
ask() {
  curl -sf --cacert "$WORK/cert.pem" "https://127.0.0.1:$PORT/v1/chat/completions" \
    -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
    -d "{\"model\":\"smollm2-135m\",\"max_tokens\":4,\"stop\":[\"$CANARY\"],\"messages\":[{\"role\":\"system\",\"content\":\"Chart of $CANARY.\"},{\"role\":\"user\",\"content\":\"Patient $CANARY, visit $1: summarize.\"}]}" \
    >/dev/null
}
REQUESTS=24
echo 0 >"$WORK/progress"
( for i in $(seq 1 "$REQUESTS"); do ask "$i" || echo "request $i failed" >&2; echo "$i" >"$WORK/progress"; done ) &
LOAD_PID=$!
wait_progress() {
  for _ in $(seq 1 600); do
    [ "$(cat "$WORK/progress")" -ge "$1" ] && return 0
    sleep 0.1
  done
  fail "requests stalled at $(cat "$WORK/progress") of $1"
}

# Mid-stream: the collector dies while records keep coming.
wait_progress 8
kill -KILL "$RSYSLOG_PID"
wait "$RSYSLOG_PID" 2>/dev/null || true
RSYSLOG_PID=""
say "collector killed after request $(cat "$WORK/progress")"
wait_progress 16
READY="$(curl -s --cacert "$WORK/cert.pem" -H "Authorization: Bearer $KEY" -w ' %{http_code}' "https://127.0.0.1:$PORT/ready")"
LAG_DOWN="$(metric salus_audit_forward_lag_records)"
status=0
if [[ "$READY" == *audit_forward_lagging*" 200" ]]; then
  say "PASS /ready warns while the collector is down and stays 200 (lag $LAG_DOWN records)"
else
  echo "FAIL siem-forward: /ready while the collector is down: $READY" >&2; status=1
fi
start_collector
say "collector restarted after request $(cat "$WORK/progress")"
wait "$LOAD_PID"
LOAD_PID=""
for _ in $(seq 1 300); do
  [ "$(metric salus_audit_forward_lag_records)" = "0" ] && break
  sleep 0.1
done
FAILURES="$(metric salus_audit_forward_connection_failures_total)"
SENT="$(metric salus_audit_forward_records_total)"
[ "$(metric salus_audit_forward_lag_records)" = "0" ] || { echo "FAIL siem-forward: the forwarder did not catch up" >&2; status=1; }
[ "${FAILURES:-0}" -ge 1 ] || { echo "FAIL siem-forward: no connection failure counted" >&2; status=1; }

# Stop Salus (server.stopped is forwarded at shutdown), then the collector.
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || { echo "FAIL siem-forward: salus exited non-zero" >&2; status=1; }
SERVER_PID=""
stop_pid "$RSYSLOG_PID"
RSYSLOG_PID=""

"$BIN" audit query --dir "$WORK/audit" --key "file:$WORK/audit.key" >"$WORK/trail.jsonl"
python3 - "$WORK/trail.jsonl" "$WORK/received.log" "$BATCH" <<'PY' || status=1
import json, re, sys
trail = {r["seq"]: r for r in map(json.loads, filter(str.strip, open(sys.argv[1])))}
last, batch = max(trail), int(sys.argv[3])
line_re = re.compile(r'^<\d{1,3}>1 \S+ \S+ salus - (\S+) \[salus@32473 seq="(\d+)" kind="([^"]+)" time="[^"]+" event_id="([^"]+)"')
arrivals = []
for n, line in enumerate(open(sys.argv[2], encoding="utf-8"), 1):
    m = line_re.match(line)
    if not m:
        sys.exit(f"FAIL siem-forward: line {n} of the collector's file is not a salus RFC 5424 message: {line[:120]!r}")
    msgid, seq, kind, event_id = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    r = trail.get(seq)
    if r is None or (r["kind"], r["event_id"]) != (kind, event_id) or msgid != kind:
        sys.exit(f"FAIL siem-forward: seq {seq} arrived as {kind} {event_id}, the trail holds {r and (r['kind'], r['event_id'])}")
    arrivals.append(seq)
expect, i, dups = 1, 0, 0
while i < len(arrivals):
    s = arrivals[i]
    if s == expect:
        expect, i = expect + 1, i + 1
        continue
    if s > expect:
        sys.exit(f"FAIL siem-forward: gap: seq {s} arrived, {expect} never did")
    n = expect - s
    if n > batch or arrivals[i:i + n] != list(range(s, expect)):
        sys.exit(f"FAIL siem-forward: seq {s} arrived again, not as one re-sent batch of at most {batch}: {arrivals[i:i + n]}")
    dups, i = dups + n, i + n
if expect != last + 1:
    sys.exit(f"FAIL siem-forward: records {expect}..{last} never arrived")
kinds = {trail[s]["kind"] for s in trail}
print(f"siem-forward: PASS all {last} records arrived in order ({len(arrivals)} messages, {dups} re-sent after the restart; "
      f"kinds: {', '.join(sorted(kinds))})")
PY
if grep -rqF "$CANARY" "$WORK/received.log" "$WORK/rsyslog"; then
  echo "FAIL siem-forward: the canary reached the collector" >&2; status=1
else
  say "PASS no canary text at the collector ($(wc -c <"$WORK/received.log") bytes scanned)"
fi
if grep -aqF "$CANARY" "$WORK/server.out" "$WORK/server.err"; then
  echo "FAIL siem-forward: the canary is in the server's output" >&2; status=1
fi
say "records sent $SENT, connection failures $FAILURES, lag while down $LAG_DOWN; $((SECONDS - START)) s"
if [ "$status" -ne 0 ]; then
  echo "--- server stderr (last 30 lines) ---" >&2; tail -30 "$WORK/server.err" >&2
  echo "--- rsyslog output ---" >&2; tail -20 "$WORK/rsyslog.out" >&2 || true
fi
exit "$status"
