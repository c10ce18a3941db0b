"""Authentication (key file, JWT), TLS/mTLS, priority classes, tenant cache isolation and the audit log,
against one real `shoal serve --policy` subprocess over mutual TLS.

Everything secret is made here: a CA, server and client certificates (cryptography), an RSA signing key
whose JWKS a small local HTTP server publishes (counting fetches), and API keys made with `shoal keys`.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from shoal.cli import app as shoal_cli
from shoal.policy.config import PolicyError, load_policy
from shoal.policy.jwt_auth import JWTPolicy, JWTVerifier, TokenRejected
from shoal.policy.tenancy import TenantsPolicy

try:
    from server_fixture import launch_own_server, metric_samples, stop_process
except ImportError:  # tests/ became a package
    from tests.server_fixture import launch_own_server, metric_samples, stop_process  # type: ignore[no-redef]

ISSUER, AUDIENCE = "https://idp.test", "shoal"
AUDIT_KEY = "k" * 40
START_TIMEOUT_S = 90


# --- certificates and keys ---------------------------------------------------------------------------


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _cert(subject: str, key, issuer_cert=None, issuer_key=None, ca=False, server=False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write_pem(path: Path, cert: x509.Certificate, key) -> tuple[str, str]:
    cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_path), str(key_path)


@dataclass
class PKI:
    ca: str
    server: tuple[str, str]
    client: tuple[str, str]

    def context(self, client_cert: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca)
        if client_cert:
            ctx.load_cert_chain(*self.client)
        return ctx


def make_pki(tmp: Path) -> PKI:
    ca_key, server_key, client_key = _rsa(), _rsa(), _rsa()
    ca = _cert("shoal test CA", ca_key, ca=True)
    ca_path, _ = _write_pem(tmp / "ca", ca, ca_key)
    server = _write_pem(tmp / "server", _cert("127.0.0.1", server_key, ca, ca_key, server=True), server_key)
    client = _write_pem(tmp / "client", _cert("client", client_key, ca, ca_key), client_key)
    return PKI(ca_path, server, client)


class JWKSServer:
    """Publishes one RSA public key as a JWKS at /jwks.json and counts the fetches."""

    def __init__(self, public_key):
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(public_key, as_dict=True)
        body = json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}).encode()
        self.fetches = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                outer.fetches += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def make_jwt(key, kid: str = "k1", **overrides) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "tenant": "jwt-co", "exp": now + 300}
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


def unsigned_jwt() -> str:
    """alg none (RFC 7519 section 6): no signature at all."""
    return jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 300}, None, algorithm="none"
    )


def create_key(keys_file: Path, *args: str) -> tuple[str, str]:
    out = CliRunner().invoke(shoal_cli, ["keys", "create", "--file", str(keys_file), *args])
    assert out.exit_code == 0, out.output
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    return lines["id"], lines["key"]


# --- the server --------------------------------------------------------------------------------------


@dataclass
class SecureServer:
    url: str
    pki: PKI
    keys_file: Path
    audit_file: Path
    keys: dict[str, tuple[str, str]]  # name -> (id, key)
    signing_key: rsa.RSAPrivateKey
    jwks: JWKSServer
    log_tail: object

    def client(self, key: str | None = None, **headers: str) -> httpx.Client:
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.Client(base_url=self.url, verify=self.pki.context(), headers=headers, timeout=60)

    def key(self, name: str) -> str:
        return self.keys[name][1]


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    pki = make_pki(tmp)
    signing_key = _rsa()
    jwks = JWKSServer(signing_key.public_key())
    keys_file = tmp / "keys.json"
    keys = {
        "premium_a": create_key(keys_file, "--tenant", "a", "--class", "premium"),
        "standard_a": create_key(keys_file, "--tenant", "a", "--class", "standard"),
        "b": create_key(keys_file, "--tenant", "b"),
        "doomed": create_key(keys_file, "--tenant", "b"),
    }
    audit_file = tmp / "audit.log"
    policy = {
        "classes": {"premium": {"priority": 0}, "standard": {"priority": 10}},
        "default_class": "standard",
        "auth": {
            "keys_file": str(keys_file),
            "protect_metrics": True,
            "jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": jwks.url, "class_claim": "tier"},
        },
        "audit": {"file": str(audit_file)},
        # With --max-num-seqs 1: standard is shed at 1 waiting request, premium at 2.
        "shedding": {"max_waiting_requests": 2, "low_priority_share": 0.5},
    }
    (tmp / "policy.yaml").write_text(json.dumps(policy))  # JSON is YAML
    server = launch_own_server(
        "secure",
        [
            "--policy",
            str(tmp / "policy.yaml"),
            "--scheduling-policy",
            "priority",
            "--record-schedule",
            "--max-num-seqs",
            "1",
            "--ssl-certfile",
            pki.server[0],
            "--ssl-keyfile",
            pki.server[1],
            "--ssl-ca-certs",
            pki.ca,
            "--ssl-cert-reqs",
            "2",
        ],  # fmt: skip
        env={"SHOAL_AUDIT_KEY": AUDIT_KEY},
    )
    url = server.url.replace("http://", "https://")
    _wait_ready_tls(server, url, pki)
    yield SecureServer(url, pki, keys_file, audit_file, keys, signing_key, jwks, server.log_tail)
    stop_process(server.proc)
    jwks.httpd.shutdown()


def _wait_ready_tls(server, url: str, pki: PKI) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"shoal serve exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{url}/ready", verify=pki.context(), timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"shoal serve not ready after {START_TIMEOUT_S}s:\n{server.log_tail()}")


def audit_lines(secure: SecureServer, request_ids: set[str], timeout: float = 5.0) -> dict[str, dict]:
    """The audit records of these requests (written just after each response is sent: poll briefly)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(x) for x in secure.audit_file.read_text().splitlines() if x.strip()]
        found = {r["request_id"]: r for r in lines if r["request_id"] in request_ids}
        if len(found) == len(request_ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def complete(client: httpx.Client, prompt: str = "Once upon a time", **body) -> httpx.Response:
    return client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "temperature": 0, **body})


# --- acceptance 1: authentication, and its audit -----------------------------------------------------


@pytest.mark.timeout(60)
def test_every_refused_credential_is_401_and_audited_without_the_secret(secure):
    other_key = _rsa()
    now = int(time.time())
    bad = {  # what -> (credential, the reason the audit log must give)
        "no credential": (None, "missing bearer credential"),
        "wrong key": ("shoal-000000000000.not-a-key", "unknown API key"),
        "not a key at all": ("wrong", "unknown API key"),
        "revoked key": (secure.key("doomed"), "has been revoked"),
        "expired JWT": (make_jwt(secure.signing_key, exp=now - 60), "expired"),
        "not yet valid JWT": (make_jwt(secure.signing_key, nbf=now + 600), "not yet valid"),
        "wrong-audience JWT": (make_jwt(secure.signing_key, aud="someone-else"), "Audience"),
        "wrong-issuer JWT": (make_jwt(secure.signing_key, iss="https://evil.test"), "issuer"),
        "badly signed JWT": (make_jwt(other_key), "Signature verification failed"),
        "alg none JWT": (unsigned_jwt(), "'none' is not allowed"),
    }
    with secure.client(secure.key("doomed")) as c:
        assert complete(c).status_code == 200  # the key works until it is revoked
    out = CliRunner().invoke(
        shoal_cli, ["keys", "revoke", secure.keys["doomed"][0], "--file", str(secure.keys_file)]
    )
    assert out.exit_code == 0, out.output
    ids = {}
    for what, (credential, _reason) in bad.items():
        with secure.client(credential) as c:
            r = complete(c)
        assert r.status_code == 401, (what, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        ids[r.headers["x-request-id"]] = what
    with secure.client(make_jwt(secure.signing_key)) as c:
        good = complete(c)
    assert good.status_code == 200, good.text
    records = audit_lines(secure, set(ids) | {good.headers["x-request-id"]})
    assert set(records) == set(ids) | {good.headers["x-request-id"]}
    for request_id, what in ids.items():
        assert records[request_id]["status"] == 401, what
        assert bad[what][1] in records[request_id]["auth_failure"], (what, records[request_id])
    assert records[good.headers["x-request-id"]]["key_id"] == "user-1"
    assert records[good.headers["x-request-id"]]["tenant"] == "jwt-co"
    text = secure.audit_file.read_text()
    for secret in [c for c, _ in bad.values() if c] + [k for _, k in secure.keys.values()]:
        assert secret not in text, "a credential reached the audit log"
    assert secure.jwks.fetches == 1, "the JWKS is fetched once and cached"


@pytest.mark.timeout(30)
def test_scope_probes_open_everything_else_needs_a_credential(secure):
    with secure.client() as anonymous, secure.client(secure.key("b")) as keyed:
        for path in ("/health", "/ready"):
            assert anonymous.get(path).status_code == 200, path
        for method, path in [("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/docs"),
                             ("GET", "/openapi.json"), ("GET", "/debug/schedule")]:  # fmt: skip
            assert anonymous.request(method, path).status_code == 401, path
            assert keyed.request(method, path).status_code == 200, path
        for path, body in [("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1, 2]})]:
            assert anonymous.post(path, json=body).status_code == 401, path
            assert keyed.post(path, json=body).status_code == 200, path


def test_keys_are_stored_hashed_and_shown_once(tmp_path):
    keys_file = tmp_path / "keys.json"
    key_id, key = create_key(keys_file, "--tenant", "t", "--class", "premium", "--rpm", "10")
    stored = keys_file.read_text()
    assert key not in stored and key.split(".", 1)[1] not in stored and key_id in stored
    listing = CliRunner().invoke(shoal_cli, ["keys", "list", "--file", str(keys_file)])
    assert listing.exit_code == 0 and key_id in listing.stdout and key not in listing.stdout
    assert oct(keys_file.stat().st_mode & 0o777) == "0o600"
    missing = CliRunner().invoke(shoal_cli, ["keys", "revoke", "nope", "--file", str(keys_file)])
    assert missing.exit_code == 1


# --- JWT checks that need no server ------------------------------------------------------------------


def test_jwt_policy_never_allows_none_and_refuses_short_hmac_keys(tmp_path):
    with pytest.raises(ValueError, match="never allowed"):
        JWTPolicy(issuer=ISSUER, audience=AUDIENCE, algorithms=["none"], jwks_file=tmp_path / "x")
    short = {"keys": [{"kty": "oct", "kid": "h", "alg": "HS256", "k": "c2hvcnQ"}]}
    (tmp_path / "short.json").write_text(json.dumps(short))
    with pytest.raises(ValueError, match="at least 32 bytes"):
        JWTVerifier(
            JWTPolicy(
                issuer=ISSUER, audience=AUDIENCE, algorithms=["HS256"], jwks_file=tmp_path / "short.json"
            )
        )


def test_jwt_alg_must_be_its_keys_so_an_rsa_public_key_is_no_hmac_secret(tmp_path):
    """The classic confusion attack: an HS256 token 'signed' with the RSA public key's PEM."""
    signing = _rsa()
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(signing.public_key(), as_dict=True)
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256"}]}))
    policy = JWTPolicy(
        issuer=ISSUER, audience=AUDIENCE, algorithms=["RS256", "HS256"], jwks_file=tmp_path / "jwks.json"
    )
    verifier = JWTVerifier(policy)
    assert verifier.verify(make_jwt(signing)).tenant == "jwt-co"
    pem = signing.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = {"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60}
    forged = _hs256(claims, pem)
    with pytest.raises(TokenRejected, match="not its key's"):
        verifier.verify(forged)


def test_a_jwks_url_is_cached_and_refetched_for_unknown_kids_at_most_once_per_interval():
    signing = _rsa()
    idp = JWKSServer(signing.public_key())
    try:
        policy = JWTPolicy(issuer=ISSUER, audience=AUDIENCE, jwks_url=idp.url, jwks_refresh_min_s=30)
        verifier = JWTVerifier(policy)
        for _ in range(3):
            assert verifier.verify(make_jwt(signing)).key_id == "user-1"
        for _ in range(3):  # made-up kids: one early refetch at most per interval
            with pytest.raises(TokenRejected, match="no key with kid 'k9'"):
                verifier.verify(make_jwt(signing, kid="k9"))
        assert idp.fetches == 1
        policy.jwks_refresh_min_s = 0  # the interval has passed: a rotation is looked for once more
        with pytest.raises(TokenRejected):
            verifier.verify(make_jwt(signing, kid="k9"))
        assert idp.fetches == 2
    finally:
        idp.httpd.shutdown()


def test_tenant_salts_isolate_unless_grouped():
    tenants = TenantsPolicy(share_groups={"eu": "acme", "us": "acme"})
    assert tenants.cache_salt("eu", None) == tenants.cache_salt("us", None)
    assert tenants.cache_salt("a", None) != tenants.cache_salt("b", None)
    assert tenants.cache_salt("a", None) != tenants.cache_salt(None, None)
    assert tenants.cache_salt("a", "x") != tenants.cache_salt("a", None)
    assert TenantsPolicy(isolate_prefix_cache=False).cache_salt("a", "x") == "x"


def test_a_jwt_class_claim_must_name_a_configured_class(tmp_path):
    signing = _rsa()
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(signing.public_key(), as_dict=True)
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1"}]}))
    policy = JWTPolicy(issuer=ISSUER, audience=AUDIENCE, jwks_file=tmp_path / "jwks.json", class_claim="tier")
    verifier = JWTVerifier(policy, classes={"premium", "standard"})
    assert verifier.verify(make_jwt(signing, tier="premium")).priority_class == "premium"
    with pytest.raises(TokenRejected, match="names no priority class"):
        verifier.verify(make_jwt(signing, tier="platinum"))


def _hs256(claims: dict, secret: bytes) -> str:
    """pyjwt refuses to sign with a PEM as HMAC secret, so sign by hand (RFC 7515 section 3.3)."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = (
        b64(json.dumps({"alg": "HS256", "kid": "k1"}).encode()) + b"." + b64(json.dumps(claims).encode())
    )
    return (signing_input + b"." + b64(hmac.new(secret, signing_input, hashlib.sha256).digest())).decode()


# --- acceptance 8: TLS -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_tls_refuses_plain_http_and_clients_without_a_certificate(secure):
    with secure.client() as c:
        assert c.get("/health").status_code == 200  # HTTPS with the test's CA and a client certificate
    with pytest.raises(httpx.HTTPError):
        httpx.get(secure.url.replace("https://", "http://") + "/health", timeout=5)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{secure.url}/health", verify=secure.pki.context(client_cert=False), timeout=5)


# --- priority classes and tenant salts ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_class_sets_the_default_priority_and_a_floor(secure):
    cases = [  # (credential, requested priority, expected)
        (secure.key("premium_a"), None, 0),
        (secure.key("standard_a"), None, 10),
        (secure.key("standard_a"), 0, 10),  # cannot raise itself above its class
        (secure.key("standard_a"), 20, 20),  # may lower itself
        (make_jwt(secure.signing_key, tier="premium"), None, 0),
        (make_jwt(secure.signing_key), None, 10),  # no class claim: the default class
    ]
    expected = {}
    for credential, requested, priority in cases:
        with secure.client(credential) as c:
            r = complete(c, **({} if requested is None else {"priority": requested}))
        assert r.status_code == 200, r.text
        expected[r.json()["id"] + "-0"] = priority
    with secure.client(secure.key("b")) as c:
        steps = c.get("/debug/schedule").json()["steps"]
    recorded = {rid: prio for step in steps for rid, _arrival, prio in step["admitted"]}
    assert {rid: recorded.get(rid) for rid in expected} == expected


@pytest.mark.timeout(60)
def test_tenants_never_hit_each_others_prefix_cache_blocks(secure):
    prompt = " ".join(f"t{i}" for i in range(60)) + f" {time.monotonic_ns()}"  # several full KV blocks

    def cached(key: str, **body) -> float:
        with secure.client(key) as c:
            before = _hits(c)
            assert complete(c, prompt, max_tokens=1, **body).status_code == 200
            return _hits(c) - before

    assert cached(secure.key("premium_a")) == 0
    assert cached(secure.key("b")) == 0, "tenant b reused tenant a's blocks"
    assert cached(secure.key("b"), cache_salt="a") == 0, "a client salt cannot reach another tenant"
    assert cached(secure.key("standard_a")) > 0, "another key of tenant a shares its blocks"


def _hits(client: httpx.Client) -> float:
    return _gauge(client, "vllm:prefix_cache_hits_total")


# --- acceptance 7, live: the server's own log verifies -----------------------------------------------


@pytest.mark.timeout(30)
def test_the_servers_audit_log_verifies_and_records_hashes_not_text(secure):
    with secure.client(secure.key("b")) as c:
        r = complete(c, "The secret plan")
    assert r.status_code == 200
    record = audit_lines(secure, {r.headers["x-request-id"]})[r.headers["x-request-id"]]
    assert record["tenant"] == "b" and record["key_id"] == secure.keys["b"][0]
    assert record["prompt_tokens"] > 0 and record["completion_tokens"] == 3 and record["latency_s"] > 0
    assert len(record["prompt_sha256"]) == 64 and len(record["output_sha256"]) == 64
    assert "secret plan" not in secure.audit_file.read_text()
    with secure.client(secure.key("b")) as c:
        exported = metric_samples(c.get("/metrics").text, "shoal:audit_log_lines")
    assert sum(exported.values()) >= record["seq"], "the head is exported for an off-box record"
    out = CliRunner().invoke(
        shoal_cli, ["audit", "verify", str(secure.audit_file)], env={"SHOAL_AUDIT_KEY": AUDIT_KEY}
    )
    assert out.exit_code == 0, out.output


# --- the policy sections: validated at start ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("auth: {jwt: {issuer: i, audience: a, algorithms: [none], jwks_url: u}}", "auth.jwt.algorithms"),
        ("auth: {jwt: {issuer: i, audience: a}}", "set exactly one of jwks_file and jwks_url"),
        ("auth: {keys: k.json}", "auth.keys"),
        ("audit: {encrypt: true}", "audit.file"),
        ("tenants: {share_groups: [a, b]}", "tenants.share_groups"),
    ],
)
def test_a_bad_security_section_names_its_field(tmp_path, text, field):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError, match="p.yaml") as err:
        load_policy(path)
    assert field in str(err.value)


@pytest.mark.timeout(60)
def test_serve_stops_before_loading_without_the_audit_key(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(f"audit: {{file: {tmp_path / 'audit.log'}}}\n")
    env = {k: v for k, v in os.environ.items() if k != "SHOAL_AUDIT_KEY"}
    out = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "serve", "--model", str(tmp_path), "--policy", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode != 0 and "SHOAL_AUDIT_KEY" in out.stderr, out.stderr[-2000:]


# --- shedding by class, before the body ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_class_shed_at_this_load_is_refused_before_its_body_is_read(secure):
    """One long premium request runs and one waits: standard (shed at 1 waiting) is refused with 503
    before its body is read, so an unparsable body gets 503, not 400, and the refusal is counted as any
    shed request is (`shoal:requests_rejected_total{reason="shed"}`); premium (shed at 2) is still parsed."""
    statuses: list[int] = []

    def long_premium() -> None:
        with secure.client(secure.key("premium_a")) as c:
            statuses.append(complete(c, max_tokens=480, ignore_eos=True).status_code)

    threads = [threading.Thread(target=long_premium) for _ in range(2)]
    for thread in threads:
        thread.start()
    garbage = {"content": b"{not json", "headers": {"content-type": "application/json"}}
    try:
        with secure.client(secure.key("b")) as c:
            deadline = time.monotonic() + 20
            while _gauge(c, "vllm:num_requests_waiting") < 1:
                assert time.monotonic() < deadline, "the premium backlog never built up"
                time.sleep(0.02)
            shed_before = _rejected(c, "shed")
            standard = c.post("/v1/completions", **garbage)
            shed_after = _rejected(c, "shed")
        with secure.client(secure.key("premium_a")) as c:
            premium = c.post("/v1/completions", **garbage)
    finally:
        for thread in threads:
            thread.join(60)
    assert standard.status_code == 503 and standard.json()["error"]["code"] == "overloaded", standard.text
    assert int(standard.headers["Retry-After"]) >= 1
    assert (
        standard.json()["error"]["type"] == "server_error"
        and "overloaded" in standard.json()["error"]["message"]
    )
    assert shed_after == shed_before + 1  # counted in shoal:requests_rejected_total{reason="shed"}
    assert premium.status_code == 400, premium.text
    assert statuses == [200, 200]


def _rejected(client: httpx.Client, reason: str) -> float:
    samples = metric_samples(client.get("/metrics").text, "shoal:requests_rejected_total")
    return sum(v for k, v in samples.items() if f'reason="{reason}"' in k)


def _gauge(client: httpx.Client, name: str) -> float:
    return sum(metric_samples(client.get("/metrics").text, name).values())
