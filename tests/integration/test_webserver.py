"""The metrics endpoint over real sockets: plain HTTP, IPv6, TLS from openssl, real bcrypt."""

from __future__ import annotations

import base64
import gzip
import logging
import shutil
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPResponse
from pathlib import Path
from urllib.error import HTTPError, URLError

import bcrypt
import pytest
from prometheus_client import CollectorRegistry, Gauge

from support.files import write_web_config
from virt_trimd.config.web import WebConfigError
from virt_trimd.web.server import (
    MetricsServer,
    MetricsServerError,
    load_web_config,
    start_metrics_server,
)

PASSWORD = "correct horse battery staple"
# Low cost keeps the suite fast; the server does not care about the cost factor.
PASSWORD_HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
TIMEOUT = 10


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    gauge = Gauge("virt_trimd_test_reclaimed_bytes", "Test gauge.", ["domain"], registry=registry)
    gauge.labels(domain="web1").set(1024)
    Gauge("virt_trimd_test_other", "Another gauge.", registry=registry).set(7)
    return registry


@pytest.fixture
def server(registry: CollectorRegistry) -> Iterator[MetricsServer]:
    with start_metrics_server(registry, "127.0.0.1", 0) as srv:
        yield srv


def fetch(
    url: str,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
    method: str = "GET",
    timeout: float = TIMEOUT,
) -> HTTPResponse:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    response = urllib.request.urlopen(request, timeout=timeout, context=context)
    assert isinstance(response, HTTPResponse)
    return response


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


# -- plain HTTP --------------------------------------------------------------------------


def test_plain_scrape_text_format(server: MetricsServer) -> None:
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"
    with fetch(server.metrics_url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        body = response.read().decode()
    assert 'virt_trimd_test_reclaimed_bytes{domain="web1"} 1024.0' in body
    assert "virt_trimd_test_other 7.0" in body


def test_openmetrics_when_asked(server: MetricsServer) -> None:
    accept = "application/openmetrics-text; version=1.0.0,text/plain;q=0.5"
    with fetch(server.metrics_url, {"Accept": accept}) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        body = response.read().decode()
    assert body.endswith("# EOF\n")


def test_gzip_when_asked(server: MetricsServer) -> None:
    with fetch(server.metrics_url, {"Accept-Encoding": "gzip"}) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        raw = response.read()
    assert 'virt_trimd_test_reclaimed_bytes{domain="web1"} 1024.0' in gzip.decompress(raw).decode()


def test_name_filter(server: MetricsServer) -> None:
    with fetch(server.metrics_url + "?name[]=virt_trimd_test_other") as response:
        body = response.read().decode()
    assert "virt_trimd_test_other 7.0" in body
    assert "virt_trimd_test_reclaimed_bytes" not in body


def test_index_healthz_head_and_404(server: MetricsServer) -> None:
    with fetch(server.url + "/") as response:
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert b'<a href="metrics">' in response.read()
    with fetch(server.url + "/healthz") as response:
        assert response.read() == b"ok\n"
    with fetch(server.metrics_url, method="HEAD") as response:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) > 0
        assert response.read() == b""
    with pytest.raises(HTTPError) as not_found:
        fetch(server.url + "/nothing-here")
    assert not_found.value.code == 404
    with pytest.raises(HTTPError) as post:
        fetch(server.metrics_url, method="POST")
    assert post.value.code == 405
    assert post.value.headers["Allow"] == "GET, HEAD"


def test_server_header_does_not_advertise_python(server: MetricsServer) -> None:
    with fetch(server.url + "/healthz") as response:
        assert "Python" not in response.headers["Server"]


def test_shutdown_closes_the_port(registry: CollectorRegistry) -> None:
    srv = start_metrics_server(registry, "127.0.0.1", 0)
    port = srv.port
    srv.shutdown()
    srv.shutdown()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


# -- IPv6 and bind errors ----------------------------------------------------------------


def _ipv6_loopback_problem() -> str | None:
    if not socket.has_ipv6:
        return "Python was built without IPv6"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        return f"cannot bind ::1 on this kernel/host: {exc}"
    return None


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_ipv6_loopback(registry: CollectorRegistry, host: str) -> None:
    problem = _ipv6_loopback_problem()
    if problem is not None:
        pytest.skip(problem)
    with start_metrics_server(registry, host, 0) as srv:
        assert srv.url == f"http://[::1]:{srv.port}"
        with fetch(srv.metrics_url) as response:
            assert b"virt_trimd_test_other 7.0" in response.read()


def test_port_already_taken(server: MetricsServer, registry: CollectorRegistry) -> None:
    with pytest.raises(MetricsServerError) as excinfo:
        start_metrics_server(registry, "127.0.0.1", server.port)
    message = str(excinfo.value)
    assert f"127.0.0.1:{server.port}" in message
    assert "Address already in use" in message
    # The first server is unharmed.
    with fetch(server.url + "/healthz") as response:
        assert response.status == 200


def test_address_not_on_this_host(registry: CollectorRegistry) -> None:
    # 203.0.113.0/24 is TEST-NET-3: never configured on a real interface.
    with pytest.raises(MetricsServerError) as excinfo:
        start_metrics_server(registry, "203.0.113.7", 0)
    assert "203.0.113.7:0" in str(excinfo.value)
    assert "Cannot assign requested address" in str(excinfo.value)


def test_port_out_of_range(registry: CollectorRegistry) -> None:
    with pytest.raises(MetricsServerError, match=r"127\.0\.0\.1:70000"):
        start_metrics_server(registry, "127.0.0.1", 70000)


# -- TLS material from the openssl CLI ---------------------------------------------------


@dataclass(frozen=True)
class Pki:
    server_cert: Path
    server_key: Path
    other_key: Path
    encrypted_key: Path
    client_ca: Path
    client_cert: Path
    client_key: Path


def _openssl(command: str, cwd: Path) -> None:
    # The commands below contain no quoting, so a plain split is the argv.
    subprocess.run(
        ["openssl", *command.split()], cwd=cwd, check=True, capture_output=True, timeout=60
    )


EC = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    # openssl is installed by .ci/install-deps.sh; without it these tests fail.
    d = tmp_path_factory.mktemp("pki")
    san = "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost"
    _openssl(
        f"req -x509 {EC} -keyout server.key -out server.crt -days 2 -subj /CN=virt-trimd-test"
        f" -addext {san}",
        d,
    )
    _openssl("genpkey -algorithm ec -pkeyopt ec_paramgen_curve:prime256v1 -out other.key", d)
    _openssl("pkey -in server.key -aes256 -passout pass:secret -out encrypted.key", d)
    _openssl(f"req -x509 {EC} -keyout ca.key -out ca.crt -days 2 -subj /CN=test-client-ca", d)
    _openssl(f"req -new {EC} -keyout client.key -out client.csr -subj /CN=prometheus", d)
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    _openssl(
        "x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2"
        " -extfile client.ext -out client.crt",
        d,
    )
    return Pki(
        server_cert=d / "server.crt",
        server_key=d / "server.key",
        other_key=d / "other.key",
        encrypted_key=d / "encrypted.key",
        client_ca=d / "ca.crt",
        client_cert=d / "client.crt",
        client_key=d / "client.key",
    )


def client_context(pki: Pki, with_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.server_cert))
    if with_client_cert:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


@pytest.fixture
def tls_server(registry: CollectorRegistry, pki: Pki, tmp_path: Path) -> Iterator[MetricsServer]:
    # Relative paths must resolve against the web config's directory, not the cwd.
    shutil.copy(pki.server_cert, tmp_path / "server.crt")
    shutil.copy(pki.server_key, tmp_path / "server.key")
    config = write_web_config(
        tmp_path,
        "tls_server_config:\n"
        "  cert_file: server.crt\n"
        "  key_file: server.key\n"
        "basic_auth_users:\n"
        f"  prometheus: {PASSWORD_HASH}\n",
    )
    with start_metrics_server(registry, "127.0.0.1", 0, config) as srv:
        yield srv


def test_tls_with_basic_auth(
    tls_server: MetricsServer, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert tls_server.url.startswith("https://")
    context = client_context(pki)

    with fetch(tls_server.metrics_url, basic("prometheus", PASSWORD), context) as response:
        assert response.status == 200
        assert b'virt_trimd_test_reclaimed_bytes{domain="web1"} 1024.0' in response.read()
    # Second scrape is answered from the auth cache; it must still succeed.
    with fetch(tls_server.metrics_url, basic("prometheus", PASSWORD), context) as response:
        assert response.status == 200

    for headers in (
        {},
        basic("prometheus", "wrong password"),
        basic("nobody", PASSWORD),
        {"Authorization": "Bearer abc"},
        {"Authorization": "Basic %%%not-base64"},
    ):
        with pytest.raises(HTTPError) as denied:
            fetch(tls_server.metrics_url, headers, context)
        assert denied.value.code == 401
        assert denied.value.headers["WWW-Authenticate"].startswith('Basic realm="virt-trimd"')
    with pytest.raises(HTTPError) as health:
        fetch(tls_server.url + "/healthz", {}, context)
    assert health.value.code == 401

    assert PASSWORD not in caplog.text
    assert PASSWORD_HASH not in caplog.text
    assert "wrong password" not in caplog.text
    assert any("rejected request" in r.getMessage() for r in caplog.records)


def test_tls_refuses_untrusted_client_side(tls_server: MetricsServer) -> None:
    # Sanity check that the test's TLS is real: a client that does not trust the
    # self-signed certificate must fail verification.
    with pytest.raises(URLError) as excinfo:
        fetch(tls_server.metrics_url, basic("prometheus", PASSWORD), ssl.create_default_context())
    assert isinstance(excinfo.value.reason, ssl.SSLCertVerificationError)


def test_plain_http_on_tls_port_fails_cleanly(tls_server: MetricsServer, pki: Pki) -> None:
    plain_url = f"http://127.0.0.1:{tls_server.port}/metrics"
    with pytest.raises(HTTPError) as excinfo:
        fetch(plain_url)
    assert excinfo.value.code == 400
    assert b"HTTP request to an HTTPS server" in excinfo.value.read()

    # A client that connects and says nothing holds only its own thread: the scrape
    # next to it must not wait for the server's 10 s handshake timeout.
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=TIMEOUT):
        auth = basic("prometheus", PASSWORD)
        with fetch(tls_server.metrics_url, auth, client_context(pki), timeout=3) as response:
            assert response.status == 200


def test_client_certificates_required(
    registry: CollectorRegistry, pki: Pki, tmp_path: Path
) -> None:
    config = write_web_config(
        tmp_path,
        "tls_server_config:\n"
        f"  cert_file: {pki.server_cert}\n"
        f"  key_file: {pki.server_key}\n"
        "  client_auth_type: RequireAndVerifyClientCert\n"
        f"  client_ca_file: {pki.client_ca}\n"
        "  min_version: TLS13\n",
    )
    with start_metrics_server(registry, "127.0.0.1", 0, config) as srv:
        with fetch(srv.metrics_url, context=client_context(pki, with_client_cert=True)) as resp:
            assert resp.status == 200
        # Without a client certificate the server aborts the handshake; in TLS 1.3 the
        # client learns it on its first read, so any connection-level error will do.
        with pytest.raises((URLError, ssl.SSLError, ConnectionError)):
            fetch(srv.metrics_url, context=client_context(pki)).read()


def test_tls12_client_refused_when_min_version_tls13(
    registry: CollectorRegistry, pki: Pki, tmp_path: Path
) -> None:
    config = write_web_config(
        tmp_path,
        f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n"
        "  min_version: TLS13\n",
    )
    with start_metrics_server(registry, "127.0.0.1", 0, config) as srv:
        context = client_context(pki)
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(URLError) as excinfo:
            fetch(srv.metrics_url, context=context)
        assert isinstance(excinfo.value.reason, ssl.SSLError)


def test_apply_web_config_changes_password(server: MetricsServer, tmp_path: Path) -> None:
    new_hash = bcrypt.hashpw(b"new-password", bcrypt.gensalt(rounds=4)).decode()
    config = load_web_config(write_web_config(tmp_path, f"basic_auth_users:\n  ops: {new_hash}\n"))
    server.apply_web_config(config)
    with pytest.raises(HTTPError) as denied:
        fetch(server.metrics_url)
    assert denied.value.code == 401
    with fetch(server.metrics_url, basic("ops", "new-password")) as response:
        assert response.status == 200
    server.apply_web_config(None)
    with fetch(server.metrics_url) as response:
        assert response.status == 200


def test_empty_web_config_means_plain_http(registry: CollectorRegistry, tmp_path: Path) -> None:
    config = write_web_config(tmp_path, "# nothing configured\n")
    with start_metrics_server(registry, "127.0.0.1", 0, config) as srv:
        assert srv.url.startswith("http://")
        with fetch(srv.metrics_url) as response:
            assert response.status == 200


# -- bad web config ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where", "expected"),
    [
        # One loader for both YAML files: unknown keys are reported at their mapping.
        (
            "tls_server_config:\n  cert_fil: x.crt\n",
            ":2: tls_server_config: unknown key 'cert_fil'",
            "did you mean 'cert_file'",
        ),
        (
            "basic_auth_users: {}\nhttp_server_config: {http2: true}\n",
            ":2: http_server_config",
            "not supported",
        ),
        ("tls_server_config:\n  key_file: k\n", "tls_server_config: missing", "'cert_file'"),
        (
            "tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n",
            ":2: tls_server_config.cert_file",
            "missing.crt",
        ),
        ("basic_auth_users:\n  alice: plaintext-oops\n", ":2: basic_auth_users.alice", "bcrypt"),
        ("basic_auth_users: [alice]\n", ":1: basic_auth_users", "mapping"),
        ("- just a list\n", "web-config.yml", "mapping"),
        ("tls_server_config: {cert_file: a\n", "web-config.yml:", "YAML"),
    ],
)
def test_bad_web_config(tmp_path: Path, text: str, where: str, expected: str) -> None:
    path = write_web_config(tmp_path, text)
    with pytest.raises(WebConfigError) as excinfo:
        load_web_config(path)
    message = str(excinfo.value)
    assert message.startswith(str(path))
    assert where in message
    assert expected in message
    assert "plaintext-oops" not in message


def _tls_config(tmp_path: Path, pki: Pki, extra: str = "", key: Path | None = None) -> Path:
    return write_web_config(
        tmp_path,
        f"tls_server_config:\n  cert_file: {pki.server_cert}\n"
        f"  key_file: {key or pki.server_key}\n{extra}",
    )


@pytest.mark.parametrize(
    ("extra", "key_name", "expected"),
    [
        ("  min_version: TLS10\n", "tls_server_config.min_version", "TLS12 or TLS13"),
        ("  client_auth_type: RequireAnyClientCert\n", "client_auth_type", "not supported"),
        ("  client_auth_type: RequireAndVerifyClientCert\n", "client_ca_file", "required"),
        ("  client_ca_file: CA\n", "client_ca_file", "client_auth_type"),
        ("  cipher_suites: [TLS_AES_128_GCM_SHA256]\n", "cipher_suites", "not supported"),
    ],
)
def test_bad_tls_options(
    tmp_path: Path, pki: Pki, extra: str, key_name: str, expected: str
) -> None:
    path = _tls_config(tmp_path, pki, extra.replace("CA", str(pki.client_ca)))
    with pytest.raises(WebConfigError) as excinfo:
        load_web_config(path)
    assert str(path) in str(excinfo.value)
    assert key_name in str(excinfo.value)
    assert expected in str(excinfo.value)


def test_key_not_matching_certificate(tmp_path: Path, pki: Pki) -> None:
    path = _tls_config(tmp_path, pki, key=pki.other_key)
    with pytest.raises(WebConfigError) as excinfo:
        load_web_config(path)
    assert str(pki.server_cert) in str(excinfo.value)
    assert str(pki.other_key) in str(excinfo.value)


def test_encrypted_key_is_refused_without_prompting(tmp_path: Path, pki: Pki) -> None:
    path = _tls_config(tmp_path, pki, key=pki.encrypted_key)
    with pytest.raises(WebConfigError, match="encrypted"):
        load_web_config(path)


def test_start_with_bad_web_config_raises(registry: CollectorRegistry, tmp_path: Path) -> None:
    path = write_web_config(tmp_path, "basic_auth_users:\n  alice: 123\n")
    with pytest.raises(WebConfigError, match=r"basic_auth_users\.alice"):
        start_metrics_server(registry, "127.0.0.1", 0, path)


def test_missing_web_config_file(registry: CollectorRegistry, tmp_path: Path) -> None:
    path = tmp_path / "absent.yml"
    with pytest.raises(WebConfigError) as excinfo:
        start_metrics_server(registry, "127.0.0.1", 0, path)
    assert str(path) in str(excinfo.value)
    assert "No such file" in str(excinfo.value)


def test_auth_cache_holds_successes_only_and_no_passwords() -> None:
    from virt_trimd.web.server import _BasicAuth

    auth = _BasicAuth({"prometheus": PASSWORD_HASH.encode()})
    header = basic("prometheus", PASSWORD)["Authorization"]
    assert auth.check(header)
    assert auth.check(header)
    assert len(auth._cache) == 1
    assert not auth.check(basic("prometheus", "wrong")["Authorization"])
    assert not auth.check(basic("intruder", PASSWORD)["Authorization"])
    assert len(auth._cache) == 1
    (key,) = auth._cache
    assert PASSWORD.encode() not in key
    assert not auth.check(None)


def test_non_string_top_level_key(tmp_path: Path) -> None:
    path = write_web_config(tmp_path, "1: x\n")
    with pytest.raises(WebConfigError) as excinfo:
        load_web_config(path)
    assert str(excinfo.value) == f"{path}:1: (root): option names must be text, got an integer (1)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The limits of the configuration file's loader hold for the web config too.
        (
            "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
            + "".join(
                f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                for p, c in zip("abcd", "bcde", strict=True)
            ),
            "more than 10000 values",
        ),
        ("x: " + "[" * 100 + "]" * 100 + "\n", "nested"),
    ],
)
def test_web_config_alias_bomb_and_depth_are_refused(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write_web_config(tmp_path, text)
    with pytest.raises(WebConfigError, match=expected):
        load_web_config(path)


def test_web_config_larger_than_the_limit_is_refused(tmp_path: Path) -> None:
    path = write_web_config(tmp_path, "# padding\n" * 200_000)
    with pytest.raises(WebConfigError, match="larger than"):
        load_web_config(path)


def test_web_config_reports_every_problem_at_once(tmp_path: Path) -> None:
    path = write_web_config(
        tmp_path,
        "tls_server_config:\n  cert_file: gone.crt\n  key_file: gone.key\n"
        "  min_version: TLS10\nbasic_auth_users:\n  bob: secret\nrate_limit: {}\n",
    )
    with pytest.raises(WebConfigError) as excinfo:
        load_web_config(path)
    lines = str(excinfo.value).splitlines()
    assert [line.split(": ", 2)[0].rsplit(":", 1)[1] for line in lines] == [
        "2",
        "3",
        "4",
        "6",
        "7",
    ]
    assert all(line.startswith(f"{path}:") for line in lines)
    assert "secret" not in str(excinfo.value)
