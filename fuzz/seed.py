#!/usr/bin/env python3
"""Writes the fuzz fixtures and the seed inputs: small valid inputs for every
target, so the fuzzer starts past the outer parsers.

Run from fuzz/ (needs the `cryptography` package):
  ./seed.py fixtures   once: fixtures/ (committed; the targets embed them)
  ./seed.py seeds      seeds/TARGET/*, then minimised into corpus/ with
                       `cargo +nightly fuzz cmin TARGET corpus/TARGET seeds/TARGET`
The key and certificates are for fuzzing only.
"""
import base64, datetime, json, os, sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

KID = "fuzz-key"
NOW = 1_767_225_600  # sigil_fuzz::NOW_UNIX, 2026-01-01T00:00:00Z
START = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
END = datetime.datetime(2035, 1, 1, tzinfo=datetime.timezone.utc)


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def read(path):
    with open(path, "rb") as f:
        return f.read()


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def der(cert):
    return cert.public_bytes(serialization.Encoding.DER)


def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def cert(subject, key, issuer, issuer_key, ca, leaf_san=True):
    b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(START).not_valid_after(END)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
    elif leaf_san:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier("spiffe://example.org/workload")]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def fixtures():
    signing = ec.generate_private_key(ec.SECP256R1())
    pk8 = lambda k: k.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    write("fixtures/signing-key.pk8", pk8(signing))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    write("fixtures/ca.pk8", pk8(ca_key))
    write("fixtures/ca.der", der(cert("Fuzz CA", ca_key, "Fuzz CA", ca_key, True)))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    write("fixtures/leaf.der", der(cert("node-1", leaf_key, "Fuzz CA", ca_key, False)))


def signing_key():
    return serialization.load_der_private_key(read("fixtures/signing-key.pk8"), None)


def ec_jwk(key):
    n = key.public_key().public_numbers()
    return {"kty": "EC", "crv": "P-256", "x": b64url(n.x.to_bytes(32, "big")),
            "y": b64url(n.y.to_bytes(32, "big"))}


def sign_jws(header, claims):
    signed = b64url(header.encode()) + "." + b64url(claims.encode())
    r, s = decode_dss_signature(signing_key().sign(signed.encode(), ec.ECDSA(hashes.SHA256())))
    return signed + "." + b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


# Protocol buffers, just enough for sigil.node.v1.SyncResponse.
def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, value):
    if isinstance(value, bool) or isinstance(value, int):
        return varint(num << 3) + varint(int(value))
    if isinstance(value, str):
        value = value.encode()
    return varint(num << 3 | 2) + varint(len(value)) + value


def entry(eid, path, rev, selectors=("unix:uid:1000",)):
    return (field(1, eid) + field(2, "spiffe://example.org/" + path)
            + field(3, "spiffe://example.org/sigil/agent/x")
            + b"".join(field(4, s) for s in selectors) + field(5, 3600)
            + field(7, "svc.example.org") + field(12, rev))


def frame(kind, flags, stream, payload):
    n = len(payload)
    return bytes([n >> 16 & 0xFF, n >> 8 & 0xFF, n & 0xFF, kind, flags]) + stream.to_bytes(4, "big") + payload


def seeds():
    ca, leaf = read("fixtures/ca.der"), read("fixtures/leaf.der")
    ca_key = serialization.load_der_private_key(read("fixtures/ca.pk8"), None)
    sk = signing_key()

    for i, s in enumerate(["spiffe://example.org/ns/default/sa/web", "unix:uid:1000",
                           "k8s:pod-label:app:web", "1h30m"]):
        write(f"seeds/spiffe_id/{i}", s)
    write("seeds/cgroup/0", "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
          "1e2d3c4b_5a69_4788_9f01_23456789abcd.slice/cri-containerd-" + "0123456789abcdef" * 4 + ".scope\n")
    write("seeds/cgroup/1", "12:memory:/kubepods/burstable/pod1e2d3c4b-5a69-4788-9f01-23456789abcd/"
          + "0123456789abcdef" * 4 + "\n")

    write("seeds/x509_svid/0", leaf)
    write("seeds/x509_svid/1", ca)
    csr_key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(name("csr"))
           .add_extension(x509.SubjectAlternativeName(
               [x509.UniformResourceIdentifier("spiffe://example.org/workload")]), critical=False)
           .sign(csr_key, hashes.SHA256()))
    write("seeds/csr/0", csr.public_bytes(serialization.Encoding.DER))

    # The SPIFFE bundle of the targets (sigil_fuzz::bundle()) and an issuer JWKS.
    bundle = json.dumps({"keys": [
        dict(ec_jwk(ca_key), use="x509-svid", x5c=[base64.b64encode(ca).decode()]),
        dict(ec_jwk(sk), use="jwt-svid", kid=KID)], "spiffe_sequence": 3,
        "spiffe_refresh_hint": 300}, separators=(",", ":"))
    write("seeds/bundle/0", bundle)
    write("seeds/jwks/0", json.dumps({"keys": [dict(ec_jwk(sk), kid=KID, use="sig", alg="ES256")]}))

    # jwt: 0x00 + whole token, or 0x01 + header NUL claims (the target signs).
    header = json.dumps({"alg": "ES256", "kid": KID, "typ": "JWT"}, separators=(",", ":"))
    claims = json.dumps({"sub": "spiffe://example.org/web", "aud": ["aud", "other"], "exp": NOW + 300,
                         "iat": NOW - 10, "nbf": NOW - 10}, separators=(",", ":"))
    write("seeds/jwt/0", b"\x00" + sign_jws(header, claims).encode())
    write("seeds/jwt/1", b"\x01" + header.encode() + b"\0" + claims.encode())

    # k8s_psat: 0x00 + evidence JSON, or 0x01 + header NUL claims.
    pheader = json.dumps({"alg": "ES256", "kid": KID}, separators=(",", ":"))
    pclaims = json.dumps({
        "iss": "https://kubernetes.default.svc", "aud": ["sigil-server"],
        "exp": NOW + 3600, "nbf": NOW - 10, "iat": NOW - 10,
        "sub": "system:serviceaccount:sigil:sigil-agent",
        "kubernetes.io": {"namespace": "sigil", "serviceaccount": {"name": "sigil-agent", "uid": "sa-uid"},
                          "pod": {"name": "sigil-agent-x1", "uid": "pod-uid-1"},
                          "node": {"name": "node-1", "uid": "node-uid-1"}}}, separators=(",", ":"))
    evidence = json.dumps({"cluster": "demo", "token": sign_jws(pheader, pclaims)})
    write("seeds/k8s_psat/0", b"\x00" + evidence.encode())
    write("seeds/k8s_psat/1", b"\x01" + pheader.encode() + b"\0" + pclaims.encode())

    # x509pop: response length, response, then the chain (leaf first).
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = cert("Fuzz intermediate", inter_key, "Fuzz CA", ca_key, True)
    leaf2 = cert("node-2", ec.generate_private_key(ec.SECP256R1()), "Fuzz intermediate", inter_key, False)
    response = bytes([0x30]) * 64
    write("seeds/x509pop/0", bytes([64]) + response + leaf)
    write("seeds/x509pop/1", bytes([64]) + response + der(leaf2) + der(inter))

    # sync: length-delimited SyncResponse messages.
    wire_bundle = field(1, "example.org") + field(2, bundle) + field(3, 3)
    msgs = [
        field(1, field(1, True) + field(2, entry("e1", "web", 1)) + field(2, entry("e2", "db", 2))
              + field(4, wire_bundle)) + field(10, 2),
        field(2, entry("e1", "web", 3, ("unix:uid:1001",))) + field(10, 3),
        field(3, "e2") + field(10, 4),
        field(1, field(2, entry("e3", "cache", 5)) + field(3, "e1")) + field(10, 5),
        field(4, wire_bundle) + field(10, 5),
        field(5, "agent banned") + field(10, 6),
    ]
    write("seeds/sync/0", b"".join(varint(len(m)) + m for m in msgs))

    # authority: preface, SETTINGS, HEADERS with C-core's authority (plain),
    # DATA, then a padded, prioritised HEADERS + CONTINUATION carrying RFC
    # 7541 C.4.1's Huffman-coded authority, then indexed repeats.
    plain = bytes([0x83, 0x86, 0x44, 5]) + b"/a/Bc" + bytes([0x41, 16]) + b"tmp%2Fagent.sock"
    huff = bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff")
    h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(0x4, 0, 0, b"")
    h2 += frame(0x1, 0x4, 1, plain) + frame(0x0, 0x1, 1, b"\0\0\0\0\0")
    h2 += frame(0x1, 0x8 | 0x20, 3, bytes([2]) + bytes([0, 0, 0, 1, 16]) + huff[:8] + b"\0\0")
    h2 += frame(0x9, 0x4, 3, huff[8:])
    h2 += frame(0x1, 0x5, 5, bytes([0xBE, 0xBF]))
    write("seeds/authority/0", bytes([0]) + h2)
    write("seeds/authority/1", bytes([2, 1, 3]) + h2)

    # sds: envoy.service.discovery.v3.DiscoveryRequest as Envoy sends them
    # (node, names, type URL; an ACK; a NACK with error_detail).
    secret = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    node = field(2, field(1, "front") + field(2, "sigil-test") + field(6, "envoy"))
    write("seeds/sds/0", node + field(3, "default") + field(4, secret))
    write("seeds/sds/1", field(1, "3") + field(3, "spiffe://example.org/web") + field(3, "ALL")
          + field(4, secret) + field(5, "00000003"))
    write("seeds/sds/2", field(1, "2") + field(3, "ROOTCA") + field(3, "spiffe://example.org")
          + field(4, secret) + field(5, "00000002") + field(6, field(1, 3) + field(2, "bad key")))
    write("seeds/sds/3", field(4, secret))


if __name__ == "__main__":
    {"fixtures": fixtures, "seeds": seeds}.get(sys.argv[1] if len(sys.argv) > 1 else "", lambda: sys.exit(__doc__))()
