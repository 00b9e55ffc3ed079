"""Tests for certgen: real keys, real certificates, a real (in-memory) TLS handshake."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import ssl
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

import certgen
from certgen import CertgenError, Issued

CERTGEN_SCRIPT = Path(__file__).resolve().parents[2] / "certgen" / "certgen.py"
ALL_STEMS = ("ca", "server", *certgen.DEFAULT_CLIENTS)


# ----------------------------------------------------------------------------- helpers


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ekus(cert: x509.Certificate) -> set[x509.ObjectIdentifier] | None:
    try:
        return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return None


def san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def common_names(cert: x509.Certificate) -> list[str]:
    return [str(attr.value) for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "certs"


@pytest.fixture(scope="module")
def ca() -> Issued:
    return certgen.make_ca()


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------- generate


def test_generate_writes_every_file(out: Path) -> None:
    result = certgen.generate(out)
    assert result == {"created": list(ALL_STEMS), "kept": []}
    expected = {f"{stem}.{ext}" for stem in ALL_STEMS for ext in ("pem", "key")}
    assert {p.name for p in out.iterdir()} == expected  # no temp files left behind
    for stem in ALL_STEMS:
        assert (out / f"{stem}.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----\n")
        # Unencrypted PKCS#8 (PEM label "PRIVATE KEY"), not the traditional EC form.
        first_line = (out / f"{stem}.key").read_bytes().split(b"\n", 1)[0]
        assert first_line.removeprefix(b"-----BEGIN ").removesuffix(b"-----") == b"PRIVATE KEY"


@pytest.mark.parametrize("umask", [0o000, 0o077, 0o022])
def test_file_modes_ignore_umask(tmp_path: Path, umask: int) -> None:
    out = tmp_path / "new" / "certs"
    old = os.umask(umask)
    try:
        certgen.generate(out, ["client-x"])
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for stem in ("ca", "server", "client-x"):
        assert stat.S_IMODE((out / f"{stem}.key").stat().st_mode) == 0o600
        assert stat.S_IMODE((out / f"{stem}.pem").stat().st_mode) == 0o644


def test_write_issued_modes_and_roundtrip(tmp_path: Path, ca: Issued, umask_zero: None) -> None:
    certgen.write_issued(tmp_path, "thing", ca)
    assert stat.S_IMODE((tmp_path / "thing.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "thing.pem").stat().st_mode) == 0o644
    loaded = certgen.load_issued(tmp_path, "thing")
    assert loaded.cert == ca.cert
    assert loaded.key.private_numbers() == ca.key.private_numbers()


def test_load_issued_rejects_mismatched_key(tmp_path: Path, ca: Issued) -> None:
    other = certgen.make_client(ca, "client.z")
    certgen.write_issued(tmp_path, "x", ca)
    certgen.write_issued(tmp_path, "y", other)
    (tmp_path / "x.key").write_bytes((tmp_path / "y.key").read_bytes())
    with pytest.raises(CertgenError, match="does not belong"):
        certgen.load_issued(tmp_path, "x")
    with pytest.raises(CertgenError, match="cannot read"):
        certgen.load_issued(tmp_path, "missing")


def test_ca_certificate(out: Path) -> None:
    certgen.generate(out, ["client.a"])
    cert = load_cert(out / "ca.pem")
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    assert bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign
    assert ku.value.crl_sign
    assert not ku.value.digital_signature
    cert.verify_directly_issued_by(cert)
    assert common_names(cert) == ["layer4lab CA"]


def test_leaf_extensions_and_algorithms(out: Path) -> None:
    certgen.generate(out, ["client.a"])
    ca_cert = load_cert(out / "ca.pem")
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    for stem in ("ca", "server", "client.a"):
        cert = load_cert(out / f"{stem}.pem")
        key = certgen.load_issued(out, stem).key
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP256R1)
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
        if stem == "ca":
            continue
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical
        assert not bc.value.ca
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical
        assert ku.value.digital_signature
        assert not ku.value.key_cert_sign
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ca_ski.digest
        assert cert.issuer == ca_cert.subject


def test_server_certificate(out: Path) -> None:
    certgen.generate(out, ["client.a"])
    cert = load_cert(out / "server.pem")
    assert ekus(cert) == {ExtendedKeyUsageOID.SERVER_AUTH}
    assert common_names(cert) == ["localhost"]
    sans = san(cert)
    assert sans is not None
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "proxy"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == []


def test_make_server_ipv6_and_custom_names(ca: Issued) -> None:
    issued = certgen.make_server(ca, ["proxy.lab", "::1", "10.0.0.7", "*.backends.lab"])
    assert common_names(issued.cert) == ["proxy.lab"]
    sans = san(issued.cert)
    assert sans is not None
    assert sans.get_values_for_type(x509.DNSName) == ["proxy.lab", "*.backends.lab"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.0.0.7"),
    ]


@pytest.mark.parametrize("names", [[], ["bad name"], ["-x"], ["a..b"], ["fe80::1%eth0"]])
def test_make_server_rejects_bad_names(ca: Issued, names: list[str]) -> None:
    with pytest.raises(CertgenError, match="server name"):
        certgen.make_server(ca, names)


def test_client_certificates(out: Path) -> None:
    certgen.generate(out)
    ca_cert = load_cert(out / "ca.pem")
    for name in certgen.DEFAULT_CLIENTS:
        cert = load_cert(out / f"{name}.pem")
        assert ekus(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
        assert common_names(cert) == [name]
        sans = san(cert)
        assert sans is not None
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
            f"spiffe://layer4lab/{name}"
        ]
        assert sans.get_values_for_type(x509.DNSName) == [name]
        cert.verify_directly_issued_by(ca_cert)


def test_chain_serials_and_validity(out: Path) -> None:
    before = datetime.now(UTC)
    certgen.generate(out)
    after = datetime.now(UTC)
    ca_cert = load_cert(out / "ca.pem")
    certs = {stem: load_cert(out / f"{stem}.pem") for stem in ALL_STEMS}
    serials = [cert.serial_number for cert in certs.values()]
    assert len(set(serials)) == len(serials)
    assert all(serial > 0 for serial in serials)
    slack = timedelta(seconds=5)
    for stem, cert in certs.items():
        cert.verify_directly_issued_by(ca_cert)
        assert cert.not_valid_before_utc <= before - timedelta(minutes=5) + slack
        assert cert.not_valid_before_utc >= before - timedelta(minutes=5) - slack
        lifetime = cert.not_valid_after_utc - after
        if stem == "ca":
            assert timedelta(days=5 * 365) - slack <= lifetime <= timedelta(days=5 * 365 + 2)
        else:
            assert timedelta(days=365) - slack <= lifetime <= timedelta(days=365) + slack
            assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc


def test_rerun_is_additive(out: Path) -> None:
    certgen.generate(out, ["client.a", "client.b"])
    before = snapshot(out)
    result = certgen.generate(out, ["client.a", "client.b", "client-x"])
    assert result == {"created": ["client-x"], "kept": ["ca", "server", "client.a", "client.b"]}
    after = snapshot(out)
    assert {name: after[name] for name in before} == before  # byte-identical
    assert set(after) - set(before) == {"client-x.pem", "client-x.key"}
    load_cert(out / "client-x.pem").verify_directly_issued_by(load_cert(out / "ca.pem"))
    # A third run with nothing new changes nothing at all.
    assert certgen.generate(out, ["client-x"])["created"] == []
    assert snapshot(out) == after


def test_rerun_with_new_server_name_reissues_only_server(out: Path) -> None:
    certgen.generate(out, ["client.a"])
    before = snapshot(out)
    result = certgen.generate(out, ["client.a"], server_names=["proxy.example", "::1"])
    assert result == {"created": ["server"], "kept": ["ca", "client.a"]}
    after = snapshot(out)
    assert after["server.pem"] != before["server.pem"]
    assert {k: v for k, v in after.items() if k != "server.pem"} == {
        k: v for k, v in before.items() if k != "server.pem"
    }
    cert = load_cert(out / "server.pem")
    cert.verify_directly_issued_by(load_cert(out / "ca.pem"))
    assert common_names(cert) == ["proxy.example"]
    sans = san(cert)
    assert sans is not None
    # The names it already had are kept.
    assert sans.get_values_for_type(x509.DNSName) == ["proxy.example", "localhost", "proxy"]
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("127.0.0.1"),
    }
    assert ekus(cert) == {ExtendedKeyUsageOID.SERVER_AUTH}
    # Asking for a subset of what it has re-issues nothing.
    assert certgen.generate(out, ["client.a"], server_names=["PROXY"])["created"] == []


def test_rerun_reissues_expired_server_with_same_key(out: Path) -> None:
    certgen.generate(out, ["client.a"])
    ca = certgen.load_issued(out, "ca")
    past = datetime.now(UTC) - timedelta(days=1)
    certgen.write_issued(out, "server", certgen.make_server(ca, not_after=past))
    before = snapshot(out)
    assert certgen.generate(out, ["client.a"])["created"] == ["server"]
    after = snapshot(out)
    assert after["server.key"] == before["server.key"]
    assert load_cert(out / "server.pem").not_valid_after_utc > datetime.now(UTC)


def test_rerun_with_expired_ca_refuses_to_sign(out: Path) -> None:
    past = datetime.now(UTC) - timedelta(days=1)
    out.mkdir()
    certgen.write_issued(out, "ca", certgen.make_ca(not_after=past))
    with pytest.raises(CertgenError, match="expired"):
        certgen.generate(out, ["client.a"])


def test_rerun_refuses_half_pair_and_orphans(out: Path) -> None:
    certgen.generate(out, ["client.a"])
    (out / "client.a.key").unlink()
    with pytest.raises(CertgenError, match=r"client\.a\.pem but no client\.a\.key"):
        certgen.generate(out, ["client.a"])
    (out / "ca.pem").unlink()
    (out / "ca.key").unlink()
    with pytest.raises(CertgenError, match="no CA"):
        certgen.generate(out, ["client.b"])


def test_rerun_refuses_client_from_other_ca(tmp_path: Path, ca: Issued) -> None:
    out = tmp_path / "certs"
    certgen.generate(out, ["client.a"])
    certgen.write_issued(out, "client.b", certgen.make_client(ca, "client.b"))
    with pytest.raises(CertgenError, match="not issued by the CA"):
        certgen.generate(out, ["client.a", "client.b"])


def test_generate_rejects_bad_input(out: Path) -> None:
    with pytest.raises(CertgenError, match="more than once"):
        certgen.generate(out, ["client.a", "client.a"])
    with pytest.raises(CertgenError, match="reserved"):
        certgen.generate(out, ["server"])
    with pytest.raises(CertgenError, match="at least one server name"):
        certgen.generate(out, server_names=[])
    assert not out.exists()  # nothing written before input is known to be good


def test_generate_rejects_file_as_out(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(CertgenError, match="not a directory"):
        certgen.generate(target)


# ------------------------------------------------------------------------- clients file


@pytest.mark.parametrize(
    "text",
    [
        "- client.a\n- client-x\n- c_1\n",
        "clients:\n  - client.a\n  - client-x\n  - c_1\n",
        '{"commonnames": ["client.a", "client-x", "c_1"]}',
    ],
    ids=["yaml-list", "yaml-mapping", "json-commonnames"],
)
def test_read_clients_file_forms(tmp_path: Path, text: str) -> None:
    path = tmp_path / "clients"
    path.write_text(text)
    assert certgen.read_clients_file(path) == ["client.a", "client-x", "c_1"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"names": ["client.a"]}', "must be a list of names"),
        ('{"commonnames": ["a"], "extra": 1}', "must be a list of names"),
        ("client.a\n", "got str"),
        ("", "got NoneType"),
        ("clients: client.a\n", "'clients' must be a list"),
        ("[]", "lists no clients"),
        ("- client.a\n- 12\n", "entry 2 is int"),
        ("- yes\n", "entry 1 is bool"),
        ("- ../x\n", r"entry 1: client name '\.\./x'"),
        ("- a\n- a\n", "more than once"),
        ("[unclosed", "not valid YAML or JSON"),
    ],
)
def test_read_clients_file_bad_shapes(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "clients.yaml"
    path.write_text(text)
    with pytest.raises(CertgenError, match=match):
        certgen.read_clients_file(path)


def test_read_clients_file_missing(tmp_path: Path) -> None:
    with pytest.raises(CertgenError, match="cannot read clients file"):
        certgen.read_clients_file(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------- name checks


@pytest.mark.parametrize(
    "name", ["client-x", "client.a", "a", "A_b-9.z", "_x", "x" * 64, "ca.x", "servers"]
)
def test_validate_name_accepts(name: str) -> None:
    assert certgen.validate_name(name) == name


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("", "must not be empty"),
        ("../x", "contains '/'"),
        ("a/b", "contains '/'"),
        ("ca", "reserved"),
        ("CA", "reserved"),
        ("server", "reserved"),
        (".hidden", "must not start with '.'"),
        ("-x", "must not start with '-'"),
        ("x" * 65, "at most 64"),
        ("a b", "contains ' '"),
        ("café", "contains 'é'"),
        ("a\nb", "contains"),
    ],
)
def test_validate_name_rejects(name: str, match: str) -> None:
    with pytest.raises(CertgenError, match=match):
        certgen.validate_name(name)


_NAME_ALPHABET = "abcXYZ019._-/ \\\n\x00é"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=_NAME_ALPHABET, max_size=70))
def test_validate_name_property(name: str) -> None:
    allowed = set("abcXYZ019._-")
    try:
        assert certgen.validate_name(name) == name
    except CertgenError:
        assert (
            not name
            or len(name) > 64
            or not set(name) <= allowed
            or name[0] in ".-"
            or name.lower() in {"ca", "server"}
        )
    else:
        assert 0 < len(name) <= 64
        assert set(name) <= allowed
        assert name[0] not in ".-"


# -------------------------------------------------------------------- make_client options


def test_make_client_expired(ca: Issued) -> None:
    past = datetime.now(UTC) - timedelta(days=1)
    issued = certgen.make_client(ca, "old", not_after=past)
    assert issued.cert.not_valid_after_utc == past.replace(microsecond=0)
    assert issued.cert.not_valid_before_utc < issued.cert.not_valid_after_utc
    issued.cert.verify_directly_issued_by(ca.cert)


def test_make_client_not_yet_valid(ca: Issued) -> None:
    future = datetime.now(UTC) + timedelta(days=2)
    issued = certgen.make_client(ca, "later", not_before=future)
    assert issued.cert.not_valid_before_utc == future.replace(microsecond=0)
    assert issued.cert.not_valid_after_utc > issued.cert.not_valid_before_utc


@pytest.mark.parametrize(
    ("eku", "expected"),
    [
        ("client", {ExtendedKeyUsageOID.CLIENT_AUTH}),
        ("server", {ExtendedKeyUsageOID.SERVER_AUTH}),
        ("both", {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}),
        ("none", None),
    ],
)
def test_make_client_eku(ca: Issued, eku: certgen.EkuChoice, expected: object) -> None:
    assert ekus(certgen.make_client(ca, "c", eku=eku).cert) == expected


def test_make_client_no_cn(ca: Issued) -> None:
    cert = certgen.make_client(ca, "anon", common_name="").cert
    assert len(cert.subject) == 0
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.critical  # RFC 5280: empty subject means a critical SAN
    assert sans.value.get_values_for_type(x509.DNSName) == ["anon"]


def test_make_client_other_cn(ca: Issued) -> None:
    cert = certgen.make_client(ca, "c", common_name="someone.else").cert
    assert common_names(cert) == ["someone.else"]


def test_make_client_san_options(ca: Issued) -> None:
    no_uri = san(certgen.make_client(ca, "c", uri="").cert)
    assert no_uri is not None
    assert no_uri.get_values_for_type(x509.UniformResourceIdentifier) == []
    assert no_uri.get_values_for_type(x509.DNSName) == ["c"]

    no_dns = san(certgen.make_client(ca, "c", dns=()).cert)
    assert no_dns is not None
    assert no_dns.get_values_for_type(x509.DNSName) == []
    assert no_dns.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://layer4lab/c"]

    custom = san(certgen.make_client(ca, "c", uri="spiffe://other/x", dns=["a", "b"]).cert)
    assert custom is not None
    assert custom.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://other/x"]
    assert custom.get_values_for_type(x509.DNSName) == ["a", "b"]

    assert san(certgen.make_client(ca, "c", uri="", dns=()).cert) is None


# ----------------------------------------------------------------------------------- CLI


def test_main_success(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clients = tmp_path / "clients.json"
    clients.write_text('{"commonnames": ["client.a", "client-x"]}')
    out = tmp_path / "certs"
    argv = ["--out", str(out), "--clients", str(clients), "--server-name", "proxy", "::1"]
    assert certgen.main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary == {
        "out": str(out),
        "created": ["ca", "server", "client.a", "client-x"],
        "kept": [],
    }
    assert "BEGIN" not in captured.out
    assert captured.err == ""
    sans = san(load_cert(out / "server.pem"))
    assert sans is not None
    assert sans.get_values_for_type(x509.DNSName) == ["proxy"]

    assert certgen.main(["--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["created"] == ["server", "client.b", "client.c", "client.d", "client.e"]
    assert summary["kept"] == ["ca", "client.a"]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--out", "{out}", "--clients", "{bad}"], "entry 1: client name '../x'"),
        (["--out", "{out}", "--clients", "{missing}"], "cannot read clients file"),
        (["--out", "{out}", "--server-name", "not a host"], "server name 'not a host'"),
        (["--clients", "{bad}"], "the following arguments are required: --out"),
        (["--out", "{out}", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_main_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], match: str
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- ../x\n")
    paths = {"out": tmp_path / "certs", "bad": bad, "missing": tmp_path / "missing.yaml"}
    assert certgen.main([arg.format(**paths) for arg in argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert match in captured.err
    assert captured.err.rstrip("\n").splitlines()[-1].startswith("certgen: error: ")
    assert "Traceback" not in captured.err
    assert not (tmp_path / "certs").exists()


def test_script_runs_standalone(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    done = subprocess.run(
        [sys.executable, str(CERTGEN_SCRIPT), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["created"] == list(ALL_STEMS)
    bad = subprocess.run(
        [sys.executable, str(CERTGEN_SCRIPT), "--out", str(out), "--server-name", "a b"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert "server name 'a b'" in bad.stderr


# --------------------------------------------------------------------- bundles and owner


def test_bundles_hold_one_service_material_and_never_the_ca_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, proxy, client = tmp_path / "ca", tmp_path / "proxy", tmp_path / "client-a"
    argv = ["--out", str(out), "--bundle", f"{proxy}=server", "--bundle", f"{client}=client.a"]
    assert certgen.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bundles"] == {
        str(proxy): ["ca.pem", "server.pem", "server.key"],
        str(client): ["ca.pem", "client.a.pem", "client.a.key"],
    }
    assert sorted(p.name for p in client.iterdir()) == ["ca.pem", "client.a.key", "client.a.pem"]
    assert stat.S_IMODE((client / "client.a.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((client / "ca.pem").stat().st_mode) == 0o644
    assert (client / "client.a.key").read_bytes() == (out / "client.a.key").read_bytes()
    assert not list(tmp_path.glob("*/ca.key"))[1:]  # only the CA's own folder has it
    # A re-run keeps everything: nothing re-issued, nothing rewritten.
    assert certgen.main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["created"] == []
    assert again["bundles"] == {str(proxy): [], str(client): []}


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--bundle", "{tmp}/x=client.z"], "client.z is not among the clients issued"),
        (["--bundle", "no-equals-sign"], "expected DIR=STEM"),
        (["--owner", "10001"], "expected UID:GID"),
    ],
)
def test_bad_bundle_or_owner_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], match: str
) -> None:
    args = ["--out", str(tmp_path / "ca"), *(a.format(tmp=tmp_path) for a in argv)]
    assert certgen.main(args) == 2
    assert match in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() != 0, reason="--owner drops privileges only when run as root")
def test_owner_gives_fresh_folders_away_and_drops_root() -> None:
    """As the compose lab runs it: root only to own the (root-made) volume folders,
    then everything is made as 10001. A separate process: the drop is for good."""
    base = Path(tempfile.mkdtemp(prefix="certgen-owner-"))  # pytest's tmp is root-only
    try:
        base.chmod(0o755)
        out, bundle = base / "ca", base / "proxy"
        bundle.mkdir()  # root-owned, as a fresh volume's folder is
        argv = ["--out", str(out), "--owner", "10001:10001", "--bundle", f"{bundle}=server"]
        done = subprocess.run(
            [sys.executable, str(CERTGEN_SCRIPT), *argv],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        made = [out, bundle, *out.iterdir(), *bundle.iterdir()]
        assert {(p.stat().st_uid, p.stat().st_gid) for p in made} == {(10001, 10001)}
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------- real TLS handshake


def server_context(out: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(out / "server.pem", out / "server.key")
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(out / "ca.pem")
    return ctx


def client_context(out: Path, stem: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname + CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(out / "ca.pem")
    ctx.load_cert_chain(out / f"{stem}.pem", out / f"{stem}.key")
    return ctx


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Handshake over memory BIOs, pumping bytes until both sides are done."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    done = {"server": False, "client": False}
    for _ in range(20):
        for side, obj in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server's verdict on the client certificate may still be in flight.
            client.write(b"ping")
            s_in.write(c_out.read())
            assert server.read(4) == b"ping"
            return server, client
    raise AssertionError("handshake did not finish")


def test_mtls_handshake_in_memory(out: Path) -> None:
    certgen.generate(out, ["client.a"])
    server, client = handshake(server_context(out), client_context(out, "client.a"), "localhost")
    peer = server.getpeercert()
    assert peer is not None
    assert (("commonName", "client.a"),) in peer["subject"]
    assert ("URI", "spiffe://layer4lab/client.a") in peer["subjectAltName"]
    server_cert = client.getpeercert()
    assert server_cert is not None
    assert (("commonName", "localhost"),) in server_cert["subject"]


def test_mtls_hostname_mismatch_fails(out: Path) -> None:
    certgen.generate(out, ["client.a"])
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(server_context(out), client_context(out, "client.a"), "elsewhere")


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("expired", "certificate has expired"),
        ("server-eku", "unsuitable certificate purpose"),
        ("other-ca", "unable to get local issuer certificate"),
    ],
)
def test_mtls_rejects_bad_client_certs(out: Path, kind: str, match: str) -> None:
    certgen.generate(out, ["client.a"])
    ca = certgen.load_issued(out, "ca")
    if kind == "expired":
        bad = certgen.make_client(ca, "bad", not_after=datetime.now(UTC) - timedelta(hours=1))
    elif kind == "server-eku":
        bad = certgen.make_client(ca, "bad", eku="server")
    else:
        bad = certgen.make_client(certgen.make_ca("rogue CA"), "bad")
    certgen.write_issued(out, "bad", bad)
    with pytest.raises(ssl.SSLError, match=match):
        handshake(server_context(out), client_context(out, "bad"), "localhost")


def test_mtls_accepts_client_without_cn(out: Path) -> None:
    certgen.generate(out, ["client.a"])
    ca = certgen.load_issued(out, "ca")
    certgen.write_issued(out, "anon", certgen.make_client(ca, "anon", common_name=""))
    server, _ = handshake(server_context(out), client_context(out, "anon"), "localhost")
    peer = server.getpeercert()
    assert peer is not None
    assert peer["subject"] == ()
    assert ("DNS", "anon") in peer["subjectAltName"]
