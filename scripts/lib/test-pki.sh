# Sourced by the test scripts that stand up a TLS peer of their own (a SIEM
# collector, an OTLP collector): a throwaway CA and a leaf certificate it
# signed for 127.0.0.1. The leaf is CA:FALSE: rustls, which Salus uses to call
# out, refuses a CA certificate as a server's own.
#
# test_pki DIR NAME CA_CN  ->  DIR/ca.pem, DIR/ca-key.pem, DIR/NAME.pem, DIR/NAME-key.pem
test_pki() {
  local dir="$1" name="$2" cn="$3"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj "/CN=$cn" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$dir/ca-key.pem" -out "$dir/ca.pem" 2>/dev/null
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$dir/$name-key.pem" -out "$dir/$name.csr" 2>/dev/null
  printf 'basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n' \
    >"$dir/$name.ext"
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" -CAcreateserial -days 1 \
    -extfile "$dir/$name.ext" -out "$dir/$name.pem" 2>/dev/null
}
