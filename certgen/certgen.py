#!/usr/bin/env python3
"""Generate the layer4lab mTLS material: one CA, one server certificate, one per client.

Usable as a module (``import certgen``) and as a command::

    python certgen/certgen.py --out DIR [--clients FILE] [--server-name NAME ...]

Files written in DIR (a contract other code relies on):

* ``ca.pem`` / ``ca.key`` -- the CA certificate and its key;
* ``server.pem`` / ``server.key`` -- the proxy's server certificate and key;
* ``<name>.pem`` / ``<name>.key`` -- one pair per client.

Keys are unencrypted PKCS#8 PEM with mode 0600, certificates are PEM with mode 0644,
every file is written atomically (temporary file in DIR, then ``os.replace``).

Re-running on an existing DIR is additive: the existing CA is loaded and used to sign
clients that are not there yet, existing files are never rewritten.  The only exception
is ``server.pem``: when it lacks a requested server name (or has expired) it is re-issued
for the existing server key, keeping the names it already had.

Only the standard library, ``cryptography`` and ``PyYAML`` are used; no key or certificate
is ever printed.  On success the command prints one JSON line such as
``{"out": "certs", "created": ["client.f"], "kept": ["ca", "server", "client.a"]}``.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, NoReturn

import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DEFAULT_CLIENTS",
    "DEFAULT_SERVER_NAMES",
    "CertgenError",
    "EkuChoice",
    "Issued",
    "generate",
    "load_issued",
    "main",
    "make_ca",
    "make_client",
    "make_server",
    "read_clients_file",
    "validate_name",
    "write_issued",
]

DEFAULT_CLIENTS: tuple[str, ...] = ("client.a", "client.b", "client.c", "client.d", "client.e")
DEFAULT_SERVER_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "proxy")

SPIFFE_PREFIX = "spiffe://layer4lab/"
CLOCK_SKEW = timedelta(minutes=5)
CA_LIFETIME = timedelta(days=5 * 365 + 1)
LEAF_LIFETIME = timedelta(days=365)

KEY_MODE = 0o600
CERT_MODE = 0o644
DIR_MODE = 0o755

MAX_NAME_LEN = 64
RESERVED_NAMES = frozenset({"ca", "server"})
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")

EkuChoice = Literal["client", "server", "both", "none"]
_EKUS: dict[str, tuple[x509.ObjectIdentifier, ...]] = {
    "client": (ExtendedKeyUsageOID.CLIENT_AUTH,),
    "server": (ExtendedKeyUsageOID.SERVER_AUTH,),
    "both": (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH),
    "none": (),
}


class CertgenError(Exception):
    """Bad input or an inconsistent output directory; the message is meant for the user."""


@dataclass(frozen=True)
class Issued:
    """A private key and the certificate issued for it."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


# --------------------------------------------------------------------------- validation


def validate_name(name: str) -> str:
    """Return ``name`` if it is usable as a client name, else raise :class:`CertgenError`.

    A client name becomes a file stem, a certificate CN, a DNS SAN and the last part of a
    SPIFFE URI, so it is restricted to ASCII letters, digits, ``.``, ``-`` and ``_``.
    """
    if not isinstance(name, str):
        raise CertgenError(
            f"client name must be a string, got {type(name).__name__} {name!r} "
            "(quote it in the clients file)"
        )
    if not name:
        raise CertgenError("client name must not be empty")
    if len(name) > MAX_NAME_LEN:
        raise CertgenError(
            f"client name {name!r} is {len(name)} characters long; at most {MAX_NAME_LEN} allowed"
        )
    bad = sorted({ch for ch in name if ch not in _NAME_CHARS})
    if bad:
        shown = ", ".join(repr(ch) for ch in bad)
        raise CertgenError(
            f"client name {name!r} contains {shown}; only ASCII letters, digits, "
            "'.', '-' and '_' are allowed"
        )
    if name[0] in ".-":
        raise CertgenError(f"client name {name!r} must not start with {name[0]!r}")
    if name.lower() in RESERVED_NAMES:
        raise CertgenError(
            f"client name {name!r} is reserved (it would clash with {name.lower()}.pem/.key)"
        )
    return name


def _validate_client_list(names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise CertgenError("clients must be a list of names, not a single string")
    result: list[str] = []
    seen: set[str] = set()
    for name in names:
        validate_name(name)
        if name in seen:
            raise CertgenError(f"client name {name!r} is listed more than once")
        seen.add(name)
        result.append(name)
    return result


_ServerName = x509.DNSName | x509.IPAddress


def _server_general_name(name: str) -> _ServerName:
    """Turn one requested server name into a SAN entry (IP literal or DNS name)."""
    if not isinstance(name, str) or not name:
        raise CertgenError(f"server name must be a non-empty string, got {name!r}")
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            raise CertgenError(f"server name {name!r}: scoped IPv6 addresses are not allowed")
        return x509.IPAddress(ip)
    host = name[2:] if name.startswith("*.") else name
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in host.split(".")):
        raise CertgenError(
            f"server name {name!r} is neither an IP address nor a valid DNS name "
            "(labels of letters, digits, '-' and '_', not starting or ending with '-')"
        )
    return x509.DNSName(name)


def _san_key(general_name: x509.GeneralName) -> tuple[str, str]:
    """A comparison key for SAN entries: DNS names case-insensitively, IPs normalised."""
    if isinstance(general_name, x509.DNSName):
        return ("dns", general_name.value.lower())
    if isinstance(general_name, x509.IPAddress):
        return ("ip", str(general_name.value))
    return (type(general_name).__name__, str(general_name.value))


def _server_sans(names: Sequence[str]) -> list[_ServerName]:
    if isinstance(names, str):
        raise CertgenError("server names must be a list of names, not a single string")
    if not names:
        raise CertgenError("at least one server name is required")
    if len(names[0]) > MAX_NAME_LEN:
        raise CertgenError(
            f"the first server name {names[0]!r} becomes the certificate CN and must be "
            f"at most {MAX_NAME_LEN} characters"
        )
    sans: list[_ServerName] = []
    seen: set[tuple[str, str]] = set()
    for name in names:
        general_name = _server_general_name(name)
        key = _san_key(general_name)
        if key not in seen:
            seen.add(key)
            sans.append(general_name)
    return sans


# ------------------------------------------------------------------------ certificates


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def _validity(
    not_before: datetime | None,
    not_after: datetime | None,
    lifetime: timedelta,
    cap: datetime | None = None,
) -> tuple[datetime, datetime]:
    """Pick a validity window.

    ``not_before`` defaults to now minus :data:`CLOCK_SKEW` (or ``lifetime`` before an explicit
    ``not_after`` that is already in the past, so expired certificates can be made on
    purpose); ``not_after`` defaults to ``lifetime`` after now, capped at ``cap``.
    """
    now = datetime.now(UTC)
    start, end = _aware(not_before), _aware(not_after)
    if start is None:
        start = now - CLOCK_SKEW
        if end is not None and end <= start:
            start = end - lifetime
    if end is None:
        end = max(now, start) + lifetime
        if cap is not None and cap > start:
            end = min(end, cap)
    if end <= start:
        raise CertgenError(
            f"not_after ({end.isoformat()}) must be after not_before ({start.isoformat()})"
        )
    return start, end


def _name(common_name: str) -> x509.Name:
    if not common_name:
        return x509.Name([])
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _authority_key_id(ca: Issued) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def make_ca(
    common_name: str = "layer4lab CA",
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> Issued:
    """Make a self-signed CA (ECDSA P-256, SHA-256) that may sign leaves only."""
    key = _new_key()
    start, end = _validity(not_before, not_after, CA_LIFETIME)
    subject = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(key=key, cert=cert)


def _make_leaf(
    ca: Issued,
    key: ec.EllipticCurvePrivateKey,
    *,
    common_name: str,
    sans: Sequence[x509.GeneralName],
    ekus: Sequence[x509.ObjectIdentifier],
    not_before: datetime | None,
    not_after: datetime | None,
) -> Issued:
    start, end = _validity(not_before, not_after, LEAF_LIFETIME, cap=ca.cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(ca), critical=False)
    )
    if ekus:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
    if sans:
        # RFC 5280 4.2.1.6: with an empty subject the SAN extension must be critical.
        builder = builder.add_extension(
            x509.SubjectAlternativeName(list(sans)), critical=not common_name
        )
    return Issued(key=key, cert=builder.sign(ca.key, hashes.SHA256()))


def make_server(
    ca: Issued,
    names: Sequence[str] = DEFAULT_SERVER_NAMES,
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> Issued:
    """Make a server certificate: CN = ``names[0]``, a DNS or IP SAN per name, serverAuth only."""
    sans = _server_sans(names)
    return _make_leaf(
        ca,
        _new_key(),
        common_name=names[0],
        sans=sans,
        ekus=_EKUS["server"],
        not_before=not_before,
        not_after=not_after,
    )


def make_client(
    ca: Issued,
    name: str,
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    eku: EkuChoice = "client",
    uri: str | None = None,
    dns: Sequence[str] | None = None,
    common_name: str | None = None,
) -> Issued:
    """Make a client certificate.

    By default: CN = ``name``, SAN URI ``spiffe://layer4lab/<name>``, SAN DNS ``name``,
    extendedKeyUsage clientAuth only.  The options exist to make bad certificates on purpose:

    * ``not_after`` in the past gives an expired certificate;
    * ``eku="none"`` omits extendedKeyUsage, ``"server"``/``"both"`` change it;
    * ``uri=""`` omits the URI SAN, ``dns=()`` omits the DNS SAN (both: no SAN extension);
    * ``common_name=""`` leaves the subject without any CN attribute.

    ``name`` is not validated here (see :func:`validate_name`); :func:`generate` does that.
    """
    if eku not in _EKUS:
        raise CertgenError(f"eku must be one of {', '.join(_EKUS)}, got {eku!r}")
    uri_value = f"{SPIFFE_PREFIX}{name}" if uri is None else uri
    dns_values: Sequence[str] = (name,) if dns is None else dns
    if isinstance(dns_values, str):
        raise CertgenError("dns must be a sequence of names, not a single string")
    sans: list[x509.GeneralName] = []
    if uri_value:
        sans.append(x509.UniformResourceIdentifier(uri_value))
    sans.extend(x509.DNSName(value) for value in dns_values)
    return _make_leaf(
        ca,
        _new_key(),
        common_name=name if common_name is None else common_name,
        sans=sans,
        ekus=_EKUS[eku],
        not_before=not_before,
        not_after=not_after,
    )


# ------------------------------------------------------------------------------- files


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with exactly ``mode``, via a temporary file and os.replace."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have removed bits (or we want fewer)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_issued(out: Path, stem: str, issued: Issued) -> None:
    """Write ``out/stem.key`` (PKCS#8 PEM, 0600) and then ``out/stem.pem`` (PEM, 0644)."""
    out = Path(out)
    _atomic_write(out / f"{stem}.key", _key_pem(issued.key), KEY_MODE)
    _atomic_write(out / f"{stem}.pem", _cert_pem(issued.cert), CERT_MODE)


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_issued(out: Path, stem: str) -> Issued:
    """Load ``out/stem.pem`` and ``out/stem.key``; raise :class:`CertgenError` if unusable."""
    out = Path(out)
    cert_path, key_path = out / f"{stem}.pem", out / f"{stem}.key"
    try:
        cert_data = cert_path.read_bytes()
        key_data = key_path.read_bytes()
    except OSError as exc:
        raise CertgenError(f"cannot read {exc.filename}: {exc.strerror or exc}") from exc
    try:
        cert = x509.load_pem_x509_certificate(cert_data)
    except ValueError as exc:
        raise CertgenError(f"{cert_path} is not a PEM certificate: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as exc:
        raise CertgenError(f"{key_path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertgenError(f"{key_path} is not an ECDSA key")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise CertgenError(f"{key_path} does not belong to the certificate in {cert_path}")
    return Issued(key=key, cert=cert)


def read_clients_file(path: Path) -> list[str]:
    """Read client names from YAML or JSON.

    Accepted shapes: a list of names; a mapping ``{clients: [...]}``; the reference JSON form
    ``{"commonnames": [...]}``.  Names are validated and must be unique.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CertgenError(f"cannot read clients file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise CertgenError(f"clients file {path} is not UTF-8 text") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise CertgenError(f"clients file {path} is not valid YAML or JSON: {detail}") from exc
    shape = 'a list of names, a mapping {clients: [...]} or {"commonnames": [...]}'
    items: object
    if isinstance(data, list):
        items = data
    elif (
        isinstance(data, dict) and len(data) == 1 and next(iter(data)) in ("clients", "commonnames")
    ):
        key = next(iter(data))
        items = data[key]
        if not isinstance(items, list):
            raise CertgenError(
                f"clients file {path}: {key!r} must be a list of names, got {type(items).__name__}"
            )
    elif isinstance(data, dict):
        keys = ", ".join(repr(str(k)) for k in data) or "no keys"
        raise CertgenError(f"clients file {path} must be {shape}; got a mapping with {keys}")
    else:
        raise CertgenError(f"clients file {path} must be {shape}; got {type(data).__name__}")
    if not items:
        raise CertgenError(f"clients file {path} lists no clients")
    names: list[str] = []
    for index, item in enumerate(items, start=1):
        if not isinstance(item, str):
            raise CertgenError(
                f"clients file {path}: entry {index} is {type(item).__name__} {item!r}, "
                "not a name (quote it)"
            )
        try:
            validate_name(item)
        except CertgenError as exc:
            raise CertgenError(f"clients file {path}: entry {index}: {exc}") from exc
        names.append(item)
    try:
        return _validate_client_list(names)
    except CertgenError as exc:
        raise CertgenError(f"clients file {path}: {exc}") from exc


# ----------------------------------------------------------------------------- generate


def _pair_exists(out: Path, stem: str) -> bool:
    """True if both files exist, False if neither; a lone half is an error."""
    cert_there = (out / f"{stem}.pem").exists()
    key_there = (out / f"{stem}.key").exists()
    if cert_there != key_there:
        present, missing = (
            (f"{stem}.pem", f"{stem}.key") if cert_there else (f"{stem}.key", f"{stem}.pem")
        )
        raise CertgenError(
            f"{out} has {present} but no {missing}; restore it, or remove {present} "
            "to have the pair generated again"
        )
    return cert_there


def _ensure_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CertgenError(f"output path {out} exists and is not a directory")
    if not out.exists():
        out.mkdir(parents=True, exist_ok=True)
        out.chmod(DIR_MODE)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bc.ca


def _check_issued_by(out: Path, stem: str, leaf: Issued, ca: Issued) -> None:
    try:
        leaf.cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertgenError(
            f"{out / (stem + '.pem')} was not issued by the CA in {out / 'ca.pem'}; "
            "remove it to have it generated again"
        ) from exc


def _check_can_sign(out: Path, ca: Issued) -> None:
    if ca.cert.not_valid_after_utc <= datetime.now(UTC):
        raise CertgenError(
            f"the CA in {out / 'ca.pem'} expired on {ca.cert.not_valid_after_utc:%Y-%m-%d}; "
            "use a new output directory"
        )


def _sans_of(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def generate(
    out: Path,
    clients: Sequence[str] = DEFAULT_CLIENTS,
    *,
    server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
) -> dict[str, list[str]]:
    """Create (or complete) the CA, server and client material in ``out``.

    Returns ``{"created": [...stems], "kept": [...stems]}``; a re-issued server certificate
    counts as created.  Existing files are never rewritten, except ``server.pem`` when it
    lacks a requested server name or has expired.
    """
    out = Path(out)
    names = _validate_client_list(clients)
    requested_sans = _server_sans(server_names)
    _ensure_dir(out)
    created: list[str] = []
    kept: list[str] = []

    if _pair_exists(out, "ca"):
        ca = load_issued(out, "ca")
        if not _is_ca(ca.cert):
            raise CertgenError(f"{out / 'ca.pem'} is not a CA certificate")
        kept.append("ca")
    else:
        orphans = [
            stem
            for stem in ("server", *names)
            if (out / f"{stem}.pem").exists() or (out / f"{stem}.key").exists()
        ]
        if orphans:
            raise CertgenError(
                f"{out} has files for {', '.join(orphans)} but no CA (ca.pem + ca.key); "
                "restore the CA or use an empty directory"
            )
        ca = make_ca()
        write_issued(out, "ca", ca)
        created.append("ca")

    if _pair_exists(out, "server"):
        server = load_issued(out, "server")
        _check_issued_by(out, "server", server, ca)
        have = _sans_of(server.cert)
        have_keys = {_san_key(general_name) for general_name in have}
        missing = [san for san in requested_sans if _san_key(san) not in have_keys]
        expired = server.cert.not_valid_after_utc <= datetime.now(UTC)
        if missing or expired:
            _check_can_sign(out, ca)
            wanted = {_san_key(san) for san in requested_sans}
            extra = [
                san
                for san in have
                if isinstance(san, x509.DNSName | x509.IPAddress) and _san_key(san) not in wanted
            ]
            reissued = _make_leaf(
                ca,
                server.key,
                common_name=server_names[0],
                sans=[*requested_sans, *extra],
                ekus=_EKUS["server"],
                not_before=None,
                not_after=None,
            )
            _atomic_write(out / "server.pem", _cert_pem(reissued.cert), CERT_MODE)
            created.append("server")
        else:
            kept.append("server")
    else:
        _check_can_sign(out, ca)
        write_issued(out, "server", make_server(ca, server_names))
        created.append("server")

    for name in names:
        if _pair_exists(out, name):
            _check_issued_by(out, name, load_issued(out, name), ca)
            kept.append(name)
        else:
            _check_can_sign(out, ca)
            write_issued(out, name, make_client(ca, name))
            created.append(name)

    return {"created": created, "kept": kept}


# ------------------------------------------------------------------- bundles and owner


def write_bundle(out: Path, directory: Path, stem: str) -> list[str]:
    """Copy what one service needs into ``directory``: ``ca.pem``, ``<stem>.pem`` and
    ``<stem>.key`` (0600), never the CA's key. Files already there with the same bytes
    and mode are kept; the names written are returned."""
    directory = Path(directory)
    _ensure_dir(directory)
    written: list[str] = []
    for name, mode in (
        ("ca.pem", CERT_MODE),
        (f"{stem}.pem", CERT_MODE),
        (f"{stem}.key", KEY_MODE),
    ):
        try:
            data = (out / name).read_bytes()
        except OSError as exc:
            raise CertgenError(f"bundle {directory}: cannot read {out / name}: {exc}") from exc
        target = directory / name
        with contextlib.suppress(OSError):
            if target.read_bytes() == data and target.stat().st_mode & 0o777 == mode:
                continue
        _atomic_write(target, data, mode)
        written.append(name)
    return written


def parse_bundle(text: str) -> tuple[Path, str]:
    """``DIR=STEM`` (``/bundles/proxy=server``, ``/bundles/client-a=client.a``)."""
    directory, sep, stem = text.partition("=")
    if not sep or not directory or not stem:
        raise _UsageError(f"--bundle: expected DIR=STEM, got {text!r}")
    return Path(directory), stem if stem == "server" else validate_name(stem)


def _bundles(texts: Sequence[str], clients: Sequence[str]) -> list[tuple[Path, str]]:
    bundles = [parse_bundle(text) for text in texts]
    unknown = [stem for _, stem in bundles if stem != "server" and stem not in clients]
    if unknown:
        raise _UsageError(f"--bundle: {', '.join(unknown)} is not among the clients issued")
    return bundles


def parse_owner(text: str) -> tuple[int, int]:
    """``UID:GID`` -> (uid, gid)."""
    uid, sep, gid = text.partition(":")
    if not sep or not uid.isdigit() or not gid.isdigit():
        raise _UsageError(f"--owner: expected UID:GID, got {text!r}")
    return int(uid), int(gid)


def become_owner(directories: Sequence[Path], uid: int, gid: int) -> bool:
    """Started as root (to own freshly made volumes): give ``directories`` to uid:gid,
    then drop to that uid and gid for good, before any key is made or read. Not root:
    nothing to do (False)."""
    if os.geteuid() != 0:
        return False
    # Load everything that is loaded lazily (OpenSSL's bindings) while the code is still
    # readable: after the drop, an interpreter under a root-only home could not.
    make_client(make_ca(), "warm.up")
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
        os.chown(directory, uid, gid)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.geteuid() != uid or os.getegid() != gid:  # pragma: no cover - defensive
        raise CertgenError(f"could not drop privileges to {uid}:{gid}")
    return True


# ---------------------------------------------------------------------------------- CLI


class _UsageError(CertgenError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _parser() -> _Parser:
    parser = _Parser(
        prog="certgen",
        description=(
            "Generate the layer4lab CA, server and client certificates. Re-running on an "
            "existing directory only adds what is missing."
        ),
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    parser.add_argument(
        "--clients",
        type=Path,
        metavar="FILE",
        help=(
            'YAML/JSON file: a list of names, {clients: [...]} or {"commonnames": [...]} '
            f"(default: {', '.join(DEFAULT_CLIENTS)})"
        ),
    )
    parser.add_argument(
        "--server-name",
        dest="server_names",
        action="extend",
        nargs="+",
        metavar="NAME",
        help=(
            "DNS name or IP address for the server certificate; repeatable, replaces the "
            f"default ({', '.join(DEFAULT_SERVER_NAMES)}); the first one becomes the CN"
        ),
    )
    parser.add_argument(
        "--bundle",
        dest="bundles",
        action="append",
        default=[],
        metavar="DIR=STEM",
        help=(
            "also copy ca.pem, STEM.pem and STEM.key (0600) into DIR, for one service "
            "(STEM: server or a client name; repeatable). The CA key is never copied"
        ),
    )
    parser.add_argument(
        "--owner",
        metavar="UID:GID",
        help=(
            "when started as root: give --out and every bundle folder to UID:GID, then "
            "drop to UID:GID before doing anything else (for fresh volumes)"
        ),
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 2 bad input, 1 I/O failure)."""
    parser = _parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
        out: Path = args.out
        clients = DEFAULT_CLIENTS if args.clients is None else read_clients_file(args.clients)
        server_names: Sequence[str] = args.server_names or DEFAULT_SERVER_NAMES
        bundles = _bundles(args.bundles, clients)
        if args.owner is not None:
            uid, gid = parse_owner(args.owner)
            become_owner([out, *(directory for directory, _ in bundles)], uid, gid)
        result = generate(out, clients, server_names=server_names)
        written = {str(d): write_bundle(out, d, stem) for d, stem in bundles}
    except _UsageError as exc:
        sys.stderr.write(parser.format_usage())
        sys.stderr.write(f"certgen: error: {exc}\n")
        return 2
    except CertgenError as exc:
        sys.stderr.write(f"certgen: error: {exc}\n")
        return 2
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        sys.stderr.write(f"certgen: error: {exc.strerror or exc}{where}\n")
        return 1
    summary: dict[str, object] = {
        "out": str(out),
        "created": result["created"],
        "kept": result["kept"],
    }
    if bundles:
        summary["bundles"] = written
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
