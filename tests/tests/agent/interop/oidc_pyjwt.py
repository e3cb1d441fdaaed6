"""A relying party that knows only an issuer URL, validating Sigil's
JWT-SVIDs with PyJWT (tests/tests/agent/oidc_discovery.rs runs it).

Usage: oidc_pyjwt.py ISSUER CA_FILE AUDIENCE < tokens (one per line)

It fetches ISSUER/.well-known/openid-configuration over HTTPS (trusting
CA_FILE only), follows its jwks_uri with PyJWT's PyJWKClient, and for each
token checks the signature, iss, aud and exp, then that a wrong audience,
a wrong issuer and a tampered signature are refused. One JSON line per
result on stdout; the exit status is 0 only if everything held.
"""

import json
import ssl
import sys
import urllib.error
import urllib.request

import jwt


def fetch(url, ctx):
    with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
        return r.status, r.headers, json.load(r)


def status_of(url, ctx, method="GET"):
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def refused(token, key, **kwargs):
    try:
        jwt.decode(token, key=key, **kwargs)
    except jwt.InvalidTokenError as e:
        return type(e).__name__
    return None


def main():
    issuer, ca_file, audience = sys.argv[1:4]
    ctx = ssl.create_default_context(cafile=ca_file)
    status, headers, doc = fetch(issuer + "/.well-known/openid-configuration", ctx)
    print(json.dumps({
        "event": "discovery",
        "status": status,
        "cache_control": headers.get("Cache-Control"),
        "document": doc,
    }), flush=True)
    if doc["issuer"] != issuer:
        print(json.dumps({"event": "error", "why": "issuer mismatch"}), flush=True)
        return 1
    algs = doc["id_token_signing_alg_values_supported"]
    keys = jwt.PyJWKClient(doc["jwks_uri"], cache_keys=False, ssl_context=ctx)
    ok = True
    for line in sys.stdin:
        token = line.strip()
        if not token:
            continue
        key = keys.get_signing_key_from_jwt(token)
        claims = jwt.decode(
            token,
            key=key,
            algorithms=algs,
            audience=audience,
            issuer=issuer,
            options={"require": ["exp", "iat", "iss", "sub", "aud"]},
        )
        common = {"key": key, "algorithms": algs}
        wrong_audience = refused(token, audience="someone-else", issuer=issuer, **common)
        wrong_issuer = refused(token, audience=audience, issuer=issuer + "/other", **common)
        head, body, sig = token.split(".")
        flipped = sig[:-4] + ("AAAA" if sig[-4:] != "AAAA" else "BBBB")
        tampered = refused(head + "." + body + "." + flipped, audience=audience, issuer=issuer, **common)
        held = bool(wrong_audience and wrong_issuer and tampered)
        ok = ok and held
        print(json.dumps({
            "event": "token",
            "sub": claims["sub"],
            "iss": claims["iss"],
            "aud": claims["aud"],
            "kid": key.key_id,
            "wrong_audience": wrong_audience,
            "wrong_issuer": wrong_issuer,
            "tampered": tampered,
        }), flush=True)
    print(json.dumps({
        "event": "other_requests",
        "unknown_path": status_of(issuer + "/nothing-here", ctx),
        "post_keys": status_of(doc["jwks_uri"], ctx, method="POST"),
    }), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
