"""Security: cluster certificates, mutual TLS and the bearer token on real servers on loopback
ephemeral ports; refused calls are refused and the node keeps serving; edge-node refuses
half-given security flags."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import stat
import urllib.error
import urllib.request

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edgesplit.protos import edgesplit_pb2, edgesplit_pb2_grpc, inference_pb2, inference_pb2_grpc
from edgesplit.runtime.codec import encode
from edgesplit.runtime.node import server as node_cli
from edgesplit.runtime.node.launcher import NodeProcess
from edgesplit.runtime.node.servicer import start_health_server
from edgesplit.runtime.transport import tls
from edgesplit.runtime.transport.auth import bearer_token, read_token, token_matches
from edgesplit.runtime.transport.client import EdgeClient, OffloadError
from tests.helpers import infer_request, start_in_thread, stop_in_thread, tiny_model

SC = grpc.StatusCode
TOKEN = "s3cret-token-for-tests"


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """The cluster's CA with a node (IP and DNS SANs), a device and a controller; plus a rogue CA."""
    cluster = tls.make_cluster_certs(
        tmp_path_factory.mktemp("cluster"), ["node=127.0.0.1,localhost", "device", "controller=198.18.0.2"]
    )
    rogue = tls.make_cluster_certs(tmp_path_factory.mktemp("rogue"), ["device", "node=127.0.0.1"], ca_name="rogue CA")
    return cluster, rogue


def pair(files, name):
    return files["hosts"][name]["cert"], files["hosts"][name]["key"]


@contextlib.contextmanager
def serving(credentials=None, token=None):
    """A tiny-model node with the given credentials/token on 127.0.0.1:0, on its own loop thread."""
    running, thread = start_in_thread(tiny_model(), workers=1,
                                      server_kwargs={"credentials": credentials, "token": token})
    try:
        yield running
    finally:
        stop_in_thread(running, thread)


@pytest.fixture(scope="module")
def mtls_node(certs):
    cluster, _ = certs
    with serving(credentials=tls.server_credentials(*pair(cluster, "node"), cluster["ca"])) as running:
        yield running


@pytest.fixture(scope="module")
def token_node():
    with serving(token=TOKEN) as running:
        yield running


def request():
    return infer_request("tiny", torch.ones(1, 4))


def secure_stub(address, credentials):
    channel = grpc.secure_channel(address, credentials)
    return channel, inference_pb2_grpc.GRPCInferenceServiceStub(channel)


def device_credentials(files, name="device"):
    return tls.channel_credentials(files["ca"], *pair(files, name))


def assert_answers(address, credentials):
    """A valid mTLS client gets an answer, through EdgeClient and through a raw stub."""
    client = EdgeClient(address, credentials=credentials)
    try:
        result = client.infer("tiny", encode(torch.ones(1, 4), "fp32"), timeout=10)
        assert result.logits.shape == (1, 3)
    finally:
        client.close()
    channel, stub = secure_stub(address, credentials)
    with channel:
        response = stub.ModelInfer(request(), timeout=10)
        assert list(response.outputs[0].shape) == [1, 3]


def answered(running) -> float:
    """Inference requests the node's data plane answered, any status."""
    return sum(
        s.value for m in running.registry.collect() if m.name == "edgesplit_node_requests" for s in m.samples
        if s.name.endswith("_total")
    )


def assert_refused(address, credentials, codes=(SC.UNAVAILABLE,)):
    channel, stub = secure_stub(address, credentials)
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request(), timeout=5)
    assert err.value.code() in codes, err.value.details()


# -- certificates ---------------------------------------------------------------------------------


def test_certificates_have_sans_both_usages_and_private_keys(certs):
    cluster, _ = certs
    for path in [cluster["ca_key"], *(entry["key"] for entry in cluster["hosts"].values())]:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    ca = x509.load_pem_x509_certificate(cluster["ca"].read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    node = x509.load_pem_x509_certificate(cluster["hosts"]["node"]["cert"].read_bytes())
    node.verify_directly_issued_by(ca)
    sans = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["node", "localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usages = node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
    assert not node.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    controller = x509.load_pem_x509_certificate(cluster["hosts"]["controller"]["cert"].read_bytes())
    ips = controller.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in ips.get_values_for_type(x509.IPAddress)] == ["198.18.0.2"]


def test_second_run_keeps_the_ca_and_rewrites_keys_private(tmp_path):
    first = tls.make_cluster_certs(tmp_path, ["a"])
    ca_pem = first["ca"].read_bytes()
    os.chmod(first["hosts"]["a"]["key"], 0o644)
    second = tls.make_cluster_certs(tmp_path, ["a", "b=10.0.0.2"])
    assert first["ca_created"] and not second["ca_created"] and second["ca"].read_bytes() == ca_pem
    assert stat.S_IMODE(os.stat(second["hosts"]["a"]["key"]).st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(ca_pem)
    x509.load_pem_x509_certificate(second["hosts"]["b"]["cert"].read_bytes()).verify_directly_issued_by(ca)


def test_certs_cli(tmp_path, capsys):
    assert tls.main(["--out", str(tmp_path / "c"), "--host", "node1=198.18.0.11,localhost", "--host", "dev"]) == 0
    assert {p.name for p in (tmp_path / "c").iterdir()} == {
        "ca.pem", "ca.key", "node1.pem", "node1.key", "dev.pem", "dev.key"
    }
    assert "198.18.0.11" in capsys.readouterr().out
    for bad in (["--host", "../evil"], ["--host", "a=not a name"], ["--host", "ca"], ["--host", "x", "--host", "x"]):
        assert tls.main(["--out", str(tmp_path / "bad"), *bad]) == 2
        assert "edgesplit certs:" in capsys.readouterr().err


def test_credentials_loaders_check_their_arguments(certs):
    cluster, _ = certs
    with pytest.raises(ValueError, match="both"):
        tls.channel_credentials(cluster["ca"], cert=cluster["hosts"]["device"]["cert"])
    with pytest.raises(FileNotFoundError, match="edgesplit certs"):
        tls.server_credentials("missing.pem", "missing.key")
    with pytest.raises(ValueError, match="not the private key"):
        tls.check_pair(cluster["hosts"]["node"]["cert"], cluster["hosts"]["device"]["key"])
    with pytest.raises(ValueError, match="not a CA"):
        tls.check_pair(*pair(cluster, "node"), ca=cluster["hosts"]["device"]["cert"])


# -- mutual TLS -----------------------------------------------------------------------------------


def test_mtls_node_answers_a_client_with_a_cluster_certificate(mtls_node, certs):
    cluster, _ = certs
    assert_answers(mtls_node.address, device_credentials(cluster))
    assert_answers(mtls_node.address, device_credentials(cluster, "controller"))  # any cluster cert will do
    # the node's DNS SAN works too, as a target name override
    channel = grpc.secure_channel(
        mtls_node.address, device_credentials(cluster), options=[("grpc.ssl_target_name_override", "localhost")]
    )
    with channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_mtls_node_refuses_clients_without_a_cluster_certificate(mtls_node, certs):
    cluster, rogue = certs
    before = answered(mtls_node)
    assert_refused(mtls_node.address, tls.channel_credentials(cluster["ca"]))  # no client certificate
    assert_refused(mtls_node.address, tls.channel_credentials(cluster["ca"], *pair(rogue, "device")))  # other CA
    assert_refused(mtls_node.address, device_credentials(rogue))  # does not trust the node: a rogue node's view
    with grpc.insecure_channel(mtls_node.address) as channel, pytest.raises(grpc.RpcError) as err:
        inference_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request(), timeout=5)
    assert err.value.code() == SC.UNAVAILABLE
    client = EdgeClient(mtls_node.address, credentials=tls.channel_credentials(cluster["ca"]))
    with pytest.raises(OffloadError) as off:
        client.infer("tiny", encode(torch.ones(1, 4), "fp32"), timeout=5)
    client.close()
    assert off.value.reason == "UNAVAILABLE"
    assert answered(mtls_node) == before, "a refused client never reaches the data plane"
    assert_answers(mtls_node.address, device_credentials(cluster))  # still serving


def test_rogue_node_is_refused_by_a_cluster_client(certs):
    cluster, rogue = certs
    with serving(credentials=tls.server_credentials(*pair(rogue, "node"), rogue["ca"])) as running:
        assert_refused(running.address, device_credentials(cluster))


# -- bearer token ---------------------------------------------------------------------------------


def test_token_is_required_on_every_call_but_health(token_node):
    with grpc.insecure_channel(token_node.address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", f"Basic {TOKEN}")],
                         [("authorization", TOKEN)], [("authorization", f"Bearer {TOKEN}x")]):
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(request(), timeout=5, metadata=metadata)
            assert err.value.code() == SC.UNAUTHENTICATED and "Bearer" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.ServerLive(inference_pb2.ServerLiveRequest(), timeout=5)
        assert err.value.code() == SC.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            edgesplit_pb2_grpc.EdgeSplitControlStub(channel).NodeInfo(edgesplit_pb2.NodeInfoRequest(), timeout=5)
        assert err.value.code() == SC.UNAUTHENTICATED
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert err.value.code() == SC.UNAUTHENTICATED
        assert answered(token_node) == 0, "refused calls never reach the data plane"
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        response = stub.ModelInfer(request(), timeout=5, metadata=[("authorization", f"Bearer {TOKEN}")])
        assert list(response.outputs[0].shape) == [1, 3]
        assert stub.ServerLive(inference_pb2.ServerLiveRequest(), metadata=[("authorization", f"bearer {TOKEN}")]).live


def test_edge_client_sends_the_token(token_node):
    x = encode(torch.ones(1, 4), "fp32")
    for token in (None, "wrong"):
        client = EdgeClient(token_node.address, token=token)
        with pytest.raises(OffloadError) as err:
            client.infer("tiny", x, timeout=5)
        client.close()
        assert err.value.reason == "UNAUTHENTICATED"
    client = EdgeClient(token_node.address, token=TOKEN)
    assert client.infer("tiny", x, timeout=5).logits.shape == (1, 3)
    client.close()


def test_mtls_and_token_together(certs):
    cluster, _ = certs
    credentials = tls.server_credentials(*pair(cluster, "node"), cluster["ca"])
    with serving(credentials=credentials, token=TOKEN) as running:
        x = encode(torch.ones(1, 4), "fp32")
        client = EdgeClient(running.address, credentials=device_credentials(cluster))
        with pytest.raises(OffloadError) as err:
            client.infer("tiny", x, timeout=5)
        assert err.value.reason == "UNAUTHENTICATED"
        client.close()
        client = EdgeClient(running.address, credentials=device_credentials(cluster), token=TOKEN)
        assert client.infer("tiny", x, timeout=5).logits.shape == (1, 3)
        client.close()


def test_health_only_port_answers_health_and_nothing_else(token_node):
    async def start():
        return await start_health_server(token_node.server.health, "127.0.0.1", 0)

    server, port = asyncio.run_coroutine_threadsafe(start(), token_node.loop).result(10)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:
                inference_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request(), timeout=5)
            assert err.value.code() == SC.UNIMPLEMENTED
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), token_node.loop).result(10)


def test_token_helpers(tmp_path):
    assert bearer_token([("x-other", "1"), ("Authorization", "Bearer  abc ")]) == "abc"
    assert bearer_token(None) is None and bearer_token([("authorization", "abc")]) is None
    assert token_matches("abc", "abc") and not token_matches("abd", "abc") and not token_matches(None, "abc")
    path = tmp_path / "token"
    path.write_text("from-file\n")
    assert read_token(path, env={"EDGESPLIT_TOKEN": "from-env"}) == "from-file"
    assert read_token(None, env={"EDGESPLIT_TOKEN": "from-env"}) == "from-env"
    assert read_token(None, env={}) is None
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_token(path, env={})
    with pytest.raises(ValueError, match="empty"):
        read_token(None, env={"EDGESPLIT_TOKEN": " "})


# -- edge-node flags ------------------------------------------------------------------------------


def test_edge_node_refuses_half_given_security_flags(certs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EDGESPLIT_TOKEN", raising=False)
    cluster, rogue = certs
    cert, key = (str(p) for p in pair(cluster, "node"))
    empty = tmp_path / "empty-token"
    empty.write_text("")
    cases = {
        "--tls-cert needs --tls-key": ["--tls-cert", cert],
        "--tls-key needs --tls-cert": ["--tls-key", key],
        "--tls-ca needs --tls-cert": ["--tls-ca", str(cluster["ca"])],
        "--metrics-tls needs --tls-cert": ["--metrics-tls"],
        "not the private key": ["--tls-cert", cert, "--tls-key", str(rogue["hosts"]["node"]["key"])],
        "not found": ["--tls-cert", cert, "--tls-key", str(tmp_path / "nope.key")],
        "is empty": ["--token-file", str(empty)],
        "token file": ["--token-file", str(tmp_path / "missing-token")],
        "is not a regular file": ["--token-file", str(tmp_path)],  # a directory: it was a traceback
        "is not a PEM certificate": ["--tls-cert", str(tmp_path), "--tls-key", key],  # a folder: a traceback
    }
    for message, flags in cases.items():
        assert node_cli.main(["--random-weights", "--port", "0", *flags]) == 2, message
        err = capsys.readouterr().err
        assert err.startswith("edge-node: ") and message in err, (message, err)
    assert "--token" not in {a for action in node_cli.build_parser()._actions for a in action.option_strings}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_edge_node_process_with_mtls_token_metrics_tls_and_health_port(certs, tmp_path):
    cluster, _ = certs
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    cert, key = (str(p) for p in pair(cluster, "node"))
    health_port = _free_port()
    flags = ["--random-weights", "--tls-cert", cert, "--tls-key", key, "--tls-ca", str(cluster["ca"]),
             "--token-file", str(token_file), "--metrics-tls", "--health-port", str(health_port)]
    with NodeProcess(model="resnet_fm", extra_args=flags) as proc:
        x = encode(torch.randn(1, 64, 7, 7), "fp32")
        client = EdgeClient(proc.address, credentials=device_credentials(cluster), token=TOKEN)
        assert client.infer("resnet_fm.from.10", x, timeout=30).logits.shape == (1, 10)
        client.close()
        client = EdgeClient(proc.address, credentials=device_credentials(cluster))
        with pytest.raises(OffloadError) as err:
            client.infer("resnet_fm.from.10", x, timeout=30)
        client.close()
        assert err.value.reason == "UNAUTHENTICATED"
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
        context = ssl.create_default_context(cafile=str(cluster["ca"]))
        context.load_cert_chain(*(str(p) for p in pair(cluster, "device")))
        url = f"https://127.0.0.1:{proc.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=10, context=context).read().decode()
        assert "edgesplit_node_requests_total" in body
        anonymous = ssl.create_default_context(cafile=str(cluster["ca"]))
        with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
            urllib.request.urlopen(url, timeout=10, context=anonymous).read()
        assert "mutual TLS, bearer token required" in proc.log_path.read_text()
        assert proc.terminate(timeout=30) == 0


def test_a_token_file_readable_by_others_is_warned_about(tmp_path, caplog):
    from edgesplit.runtime.transport.auth import read_token

    path = tmp_path / "token"
    path.write_text("s3cret\n")
    path.chmod(0o644)
    with caplog.at_level("WARNING", logger="edgesplit.auth"):
        assert read_token(path, env={}) == "s3cret"
    assert any("chmod 600" in r.getMessage() for r in caplog.records)
    caplog.clear()
    path.chmod(0o600)
    with caplog.at_level("WARNING", logger="edgesplit.auth"):
        read_token(path, env={})
    assert not caplog.records


def test_certs_cli_writes_curve_keys_for_the_telemetry_bus(tmp_path):
    from edgesplit.runtime.control.bus import CurveKeys

    assert tls.main(["--out", str(tmp_path / "c"), "--host", "dev", "--curve"]) == 0
    curve = tmp_path / "c" / "curve"
    assert {p.name for p in curve.iterdir()} == {"controller.key", "controller.key_secret", "dev.key", "dev.key_secret"}
    assert oct((curve / "dev.key_secret").stat().st_mode & 0o777) == "0o600"
    keys = CurveKeys.load(curve, "dev", server="controller")
    assert len(keys.public) == 40 and keys.server_public == CurveKeys.load(curve, "controller").public
