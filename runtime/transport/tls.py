"""Mutual TLS for a cluster: a small CA, one certificate per host, and gRPC credentials.

:func:`make_cluster_certs` writes a private certificate authority and, for every host, a
certificate signed by it whose subject alternative names are the host's DNS names and IP
addresses. Each host certificate is valid for both TLS server and TLS client
authentication, so the same pair serves a node and lets a device or controller prove who
it is to the nodes (mutual TLS). Private keys are written with mode 0600. Running it again
on the same folder keeps the CA and adds or renews host certificates.

:func:`server_credentials` and :func:`channel_credentials` load those files into gRPC
credentials for :func:`~edgesplit.runtime.node.servicer.start_node_server` and
:class:`~edgesplit.runtime.transport.client.EdgeClient`.

Example::

    files = make_cluster_certs("certs", ["node1=198.18.0.11,localhost", "device"])
    server = server_credentials(files["hosts"]["node1"]["cert"], files["hosts"]["node1"]["key"], files["ca"])
    client = EdgeClient("198.18.0.11:8001", credentials=channel_credentials(
        files["ca"], files["hosts"]["device"]["cert"], files["hosts"]["device"]["key"]))

From the command line (``edgesplit certs`` runs :func:`main`)::

    edgesplit certs --out certs --host node1=198.18.0.11 --host device=198.18.0.2 --host controller
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

DEFAULT_CA_NAME = "edgesplit cluster CA"
DEFAULT_DAYS = 365
MAX_DAYS = 100 * 365  # a century; far beyond it the certificate dates overflow (year 9999)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # a host's file name: no path separators, no ".."
_IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_host(spec: str) -> tuple[str, list[str]]:
    """Split ``NAME[=SAN,SAN...]`` into the certificate's name and its subject alternative names.

    The name is always one of the names, so ``"localhost"`` gives ``("localhost", ["localhost"])``
    and ``"node1=198.18.0.11,node1.lan"`` gives ``("node1", ["node1", "198.18.0.11", "node1.lan"])``.

    >>> parse_host("node1=198.18.0.11")
    ('node1', ['node1', '198.18.0.11'])
    """
    name, _, rest = spec.strip().partition("=")
    name = name.strip()
    if not name:
        raise ValueError(f"host {spec!r} has no name; write NAME or NAME=SAN,SAN (e.g. node1=198.18.0.11)")
    file_name = _file_name(name)
    if not _NAME.match(file_name) or file_name in {".", ".."} or file_name == "ca":
        raise ValueError(
            f"host name {name!r} cannot name a file; use letters, digits, '.', '-', '_' (and not 'ca')"
        )
    sans = [name] + [s.strip() for s in rest.split(",") if s.strip()]
    for san in sans:
        if _ip(san) is None and not _valid_dns(san):
            raise ValueError(f"{san!r} (host {name!r}) is neither an IP address nor a DNS name")
    return name, list(dict.fromkeys(sans))


def make_cluster_certs(
    out_dir: str | os.PathLike,
    hosts: Sequence[str],
    ca_name: str = DEFAULT_CA_NAME,
    days: int = DEFAULT_DAYS,
) -> dict:
    """Write a CA (``ca.pem``, ``ca.key``) and ``<host>.pem``/``<host>.key`` for every host.

    ``hosts`` holds ``NAME`` or ``NAME=SAN,SAN`` entries (see :func:`parse_host`); a name or
    SAN that parses as an IP address becomes an IP SAN, any other a DNS SAN. An existing
    ``ca.pem``/``ca.key`` pair in ``out_dir`` is reused, so more hosts can join later; host
    files are overwritten. Keys are ECDSA P-256, written with mode 0600.

    Returns ``{"ca": Path, "ca_key": Path, "ca_created": bool, "hosts": {name: {"cert": Path,
    "key": Path, "sans": [...]}}}``.
    """
    from cryptography.hazmat.primitives.asymmetric import ec

    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be between 1 and {MAX_DAYS}, not {days}")
    parsed = [parse_host(h) for h in hosts]
    if not parsed:
        raise ValueError("give at least one host (e.g. --host localhost=127.0.0.1)")
    names = [n for n, _ in parsed]
    duplicates = sorted({_file_name(n) for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"host given twice: {', '.join(duplicates)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ca_cert_path, ca_key_path = out / "ca.pem", out / "ca.key"
    if ca_cert_path.exists() != ca_key_path.exists():
        raise ValueError(f"{out} holds only one of ca.pem and ca.key; restore the other or remove both")
    ca_created = not ca_cert_path.exists()
    if ca_created:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _ca_certificate(ca_key, ca_name, days)
        _write_key(ca_key_path, ca_key)
        _write_cert(ca_cert_path, ca_cert)
    else:
        ca_cert, ca_key = _load_ca(ca_cert_path, ca_key_path)

    result: dict = {"ca": ca_cert_path, "ca_key": ca_key_path, "ca_created": ca_created, "hosts": {}}
    for name, sans in parsed:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _host_certificate(key, name, sans, ca_cert, ca_key, days)
        stem = _file_name(name)
        cert_path, key_path = out / f"{stem}.pem", out / f"{stem}.key"
        _write_key(key_path, key)
        _write_cert(cert_path, cert)
        result["hosts"][name] = {"cert": cert_path, "key": key_path, "sans": sans}
    return result


def server_credentials(
    cert: str | os.PathLike,
    key: str | os.PathLike,
    ca: str | os.PathLike | None = None,
    require_client_auth: bool = True,
) -> grpc.ServerCredentials:
    """TLS credentials of a server from PEM files.

    With ``ca``, clients are verified against it, and with ``require_client_auth`` (the
    default) a client without a certificate signed by that CA is refused during the
    handshake: mutual TLS. Without ``ca`` the server only proves its own identity and
    ``require_client_auth`` has no effect (nothing to check client certificates against).
    """
    cert_pem, key_pem = _read(cert, "certificate"), _read(key, "private key")
    root = _read(ca, "CA certificate") if ca is not None else None
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=root, require_client_auth=bool(root) and require_client_auth
    )


def channel_credentials(
    ca: str | os.PathLike,
    cert: str | os.PathLike | None = None,
    key: str | os.PathLike | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials of a client: trust ``ca``; present ``cert``/``key`` for mutual TLS."""
    if (cert is None) != (key is None):
        raise ValueError("give both the client certificate and its key, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA certificate"),
        private_key=_read(key, "private key") if key is not None else None,
        certificate_chain=_read(cert, "certificate") if cert is not None else None,
    )


def check_pair(cert: str | os.PathLike, key: str | os.PathLike, ca: str | os.PathLike | None = None) -> None:
    """Raise ValueError (saying which file) unless ``cert`` and ``key`` are PEM files that belong together.

    With ``ca``, also check that it is a PEM CA certificate. Catches mix-ups at start-up
    with a message, where gRPC would only fail the handshake later.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certificate = x509.load_pem_x509_certificate(_read(cert, "certificate"))
    except ValueError:
        raise ValueError(f"{cert} is not a PEM certificate") from None
    try:
        private_key = serialization.load_pem_private_key(_read(key, "private key"), password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{key} is not an unencrypted PEM private key") from None
    if certificate.public_key() != private_key.public_key():
        raise ValueError(f"{key} is not the private key of {cert}")
    if ca is not None:
        try:
            authority = x509.load_pem_x509_certificate(_read(ca, "CA certificate"))
        except ValueError:
            raise ValueError(f"{ca} is not a PEM certificate") from None
        try:
            constraints = authority.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise ValueError(f"{ca} is not a CA certificate (give the cluster's ca.pem)")


CERTS_DESCRIPTION = "Make a small CA and a certificate per host for mutual TLS between device, nodes and controller."
CERTS_EPILOG = "Example: edgesplit certs --out certs --host node1=198.18.0.11,localhost --host device"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgesplit certs", description=CERTS_DESCRIPTION, epilog=CERTS_EPILOG)
    return configure_parser(p)


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``edgesplit certs`` flags to ``p``."""
    p.add_argument("--out", required=True, help="folder for ca.pem, ca.key and <host>.pem/<host>.key")
    p.add_argument(
        "--host", action="append", required=True, metavar="NAME[=SAN,...]",
        help="a host: its name, optionally followed by '=' and more DNS names or IP addresses; repeat per host",
    )
    p.add_argument("--ca-name", default=DEFAULT_CA_NAME, help=f"common name of a new CA (default: {DEFAULT_CA_NAME})")
    p.add_argument("--days", type=_days, default=DEFAULT_DAYS,
                   help=f"validity in days, 1..{MAX_DAYS} (default: {DEFAULT_DAYS})")
    p.add_argument("--curve", action="store_true",
                   help="also write ZeroMQ CURVE key pairs for the telemetry bus: OUT/curve/controller.key(_secret) "
                   "and one per host")
    return p


def main(argv: list[str] | None = None) -> int:
    """``edgesplit certs``: write the CA and host certificates; 2 on a usage error."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Write the CA and host certificates from parsed flags; 2 on a usage error."""
    try:
        files = make_cluster_certs(args.out, args.host, ca_name=args.ca_name, days=args.days)
    except (ValueError, OSError) as exc:
        print(f"edgesplit certs: {exc}", file=sys.stderr)
        return 2
    print(f"CA: {files['ca']} ({'new' if files['ca_created'] else 'kept'}); keep {files['ca_key']} offline")
    for name, entry in files["hosts"].items():
        print(f"{name}: {entry['cert']} {entry['key']}  SANs: {', '.join(entry['sans'])}")
    if getattr(args, "curve", False):
        from edgesplit.runtime.control.bus import CurveKeys

        folder = Path(args.out) / "curve"
        for name in ["controller", *files["hosts"]]:
            CurveKeys.generate().save(folder, _file_name(name))
        print(f"CURVE keys for the telemetry bus: {folder} (controller and {len(files['hosts'])} hosts; "
              "every process needs controller.key, each its own pair)")
    return 0


# -- internals -------------------------------------------------------------------------------------


def _days(text: str) -> int:
    """argparse type: a validity of 1..MAX_DAYS days."""
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days") from None
    if not 1 <= days <= MAX_DAYS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_DAYS} days, not {days}")
    return days


def _file_name(name: str) -> str:
    return name.replace(":", "_")  # an IPv6 address as a host name


def _ip(text: str) -> _IpAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _valid_dns(name: str) -> bool:
    labels = name.split(".")
    return len(name) <= 253 and all(
        re.fullmatch(r"(\*|[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)", label) for label in labels
    )


def _read(path: str | os.PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} not found; make one with 'edgesplit certs'") from None
    except OSError as exc:  # a folder, unreadable: a message, not a traceback
        raise ValueError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)  # allow for clock skew


def _ca_certificate(key, ca_name: str, days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    not_before, not_after = _validity(days)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _host_certificate(key, name: str, sans: list[str], ca_cert, ca_key, days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    alt_names = [x509.IPAddress(ip) if (ip := _ip(s)) is not None else x509.DNSName(s) for s in sans]
    not_before, not_after = _validity(days)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _load_ca(cert_path: Path, key_path: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if cert.public_key() != key.public_key():
        raise ValueError(f"{key_path} is not the key of {cert_path}")
    return cert, key


def _write_cert(path: Path, cert) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _write_key(path: Path, key) -> None:
    """Write a private key readable by its owner only (0600), also when the file existed."""
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file that already existed
    with os.fdopen(fd, "wb") as f:
        f.write(data)


if __name__ == "__main__":
    sys.exit(main())
