"""Telemetry bus over ZeroMQ: telemetry from every process up, decisions from the controller down.

The controller binds two sockets: a SUB that every process's PUB connects to with its
:class:`~edgesplit.protos.telemetry_pb2.Telemetry` (topic ``telemetry``), and an XPUB that
devices subscribe to for their :class:`~edgesplit.protos.telemetry_pb2.Decision` (topic
``decision/<device>``). The XPUB sees each new subscription, so a late joiner gets the
current decision at once instead of waiting for the next change; decisions are also
repeated every ``heartbeat_s`` so a device can tell a silent controller from a quiet one.

Every message is a protobuf; one that fails to parse, or comes with a topic it does not
match, is counted (``malformed``) and dropped, never raised. With :class:`CurveKeys` the
sockets authenticate and encrypt with ZeroMQ CURVE: the controller is the CURVE server and
admits only the clients whose public keys it was given (a ZAP allow-list: ``edgesplit
controller --curve-dir`` admits every ``NAME.key`` in that folder); every client needs the
controller's public key (``edgesplit certs --curve`` writes a key pair per role).

A device's topic is ``decision/<device>`` followed by a NUL byte: ZeroMQ matches topics by
prefix, and without the terminator device ``cam1`` received every ``cam10``..``cam1999``'s
decisions too. The controller reads at most ``MAX_BATCH`` messages per poll and keeps only
the latest telemetry of each source, so a flood neither delays the heartbeat nor buys a
policy run per message.

Example (in one process, over inproc)::

    >>> import zmq
    >>> ctx = zmq.Context()
    >>> hub = ControllerSockets(ctx, "inproc://t", "inproc://d")
    >>> pub = TelemetryPublisher(ctx, "inproc://t", source="device/cam1")
    >>> sub = DecisionSubscriber(ctx, "inproc://d", device="cam1")
    >>> hub.publish_decision(decision("cam1", epoch=1, cut=3, codec="int8"))
    >>> wait_for_subscribers(hub, sub)
    >>> received = sub.receive(timeout_s=2.0)
    >>> (received.device, received.cut, received.codec)
    ('cam1', 3, 'int8')
    >>> for s in (pub, sub, hub): s.close()
    >>> ctx.term()
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.utils.z85

from edgesplit.protos import telemetry_pb2

TELEMETRY_TOPIC = b"telemetry"
DECISION_PREFIX = b"decision/"
TOPIC_END = b"\0"  # ends a device's topic: ZeroMQ matches by prefix (cam1 would get cam10's)
MAX_BATCH = 256  # messages read per socket per poll: the loop gets back to its heartbeat
MAX_KEY_FILE_BYTES = 1024
# Telemetry and decisions are small. ZeroMQ refuses a bigger frame (and drops the connection
# that sent it), but bounds frames, not messages: a multipart message of many such frames is
# received whole before it can be refused. Only CURVE (authenticated peers) bounds that.
MAX_MESSAGE_BYTES = 64 * 1024


@dataclass(frozen=True)
class CurveKeys:
    """CURVE keys (Z85 text): this socket's pair, and the controller's public key for clients."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None

    @classmethod
    def generate(cls) -> CurveKeys:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    def client_of(self, server: CurveKeys) -> CurveKeys:
        return CurveKeys(self.public, self.secret, server.public)

    def save(self, folder: str | Path, name: str) -> None:
        """``name.key`` (public) and ``name.key_secret`` (secret, mode 0600) in ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.key").write_bytes(self.public + b"\n")
        secret = folder / f"{name}.key_secret"
        secret.touch(mode=0o600)
        secret.chmod(0o600)
        secret.write_bytes(self.secret + b"\n")

    @classmethod
    def load(cls, folder: str | Path, name: str, server: str | None = None) -> CurveKeys:
        """``name``'s pair (and ``server``'s public key) from ``folder``; ValueError naming the
        file when one is missing, not a key, or the pair does not match (a mismatched pair
        started a controller no client could reach)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"CURVE key folder {folder} is not a directory")
        public = read_key(folder / f"{name}.key")
        secret = read_key(folder / f"{name}.key_secret")
        if zmq.curve_public(secret) != public:
            raise ValueError(f"CURVE keys {folder / (name + '.key')} and {name}.key_secret are not one pair")
        server_public = read_key(folder / f"{server}.key") if server else None
        return cls(public, secret, server_public)

    @staticmethod
    def public_keys(folder: str | Path) -> list[bytes]:
        """Every public key (``*.key``) in ``folder``: the clients a controller admits."""
        return [read_key(path) for path in sorted(Path(folder).glob("*.key"))]


def read_key(path: Path) -> bytes:
    """A CURVE key file: 40 characters of Z85 text (a regular file of at most 1 KiB)."""
    import stat

    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"CURVE key {path} is not a regular file")
        if info.st_size > MAX_KEY_FILE_BYTES:
            raise ValueError(f"CURVE key {path}: {info.st_size:,} bytes, not a key")
        text = path.read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"CURVE key {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        if len(text) != 40:
            raise ValueError
        zmq.utils.z85.decode(text)
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"CURVE key {path} is not a key (40 characters of Z85 text, as 'edgesplit certs "
                         "--curve' writes)") from None
    return text


class _AllowList:
    """ZAP credentials provider: admits the CURVE clients whose public keys it holds."""

    def __init__(self, keys) -> None:
        self.keys = frozenset(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


def _secure(sock: zmq.Socket, keys: CurveKeys | None, server: bool) -> None:
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is None:
        return
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    if server:
        sock.curve_server = True
    else:
        if keys.server_public is None:
            raise ValueError("a CURVE client needs the controller's public key (server_public)")
        sock.curve_serverkey = keys.server_public


def decision_topic(device: str) -> bytes:
    """The topic of ``device``'s decisions (terminated: ZeroMQ matches topics by prefix)."""
    return DECISION_PREFIX + device.encode() + TOPIC_END


def decision(device: str, epoch: int, cut: int, codec: str, thresholds: dict[int, float] | None = None,
             reason: str = "", predicted_seconds: float = 0.0,
             controller: str = "controller", confidence: str = "max_softmax") -> telemetry_pb2.Decision:
    """A Decision message; ``confidence`` is the kind the thresholds were calibrated on."""
    msg = telemetry_pb2.Decision(device=device, controller=controller, epoch=epoch, cut=cut, codec=codec,
                                 reason=reason, predicted_seconds=predicted_seconds, time=time.time(),
                                 confidence=confidence)
    for k, v in (thresholds or {}).items():
        msg.thresholds[int(k)] = float(v)
    return msg


class ControllerSockets:
    """The controller's end: receives telemetry, publishes decisions (re-sent to late joiners)."""

    def __init__(self, ctx: zmq.Context, telemetry_endpoint: str, decision_endpoint: str,
                 keys: CurveKeys | None = None, clients=None) -> None:
        """With ``keys``, ``clients`` (the admitted public keys, Z85) is required: CURVE alone
        admits anyone holding the controller's public key, which every process is given."""
        self._auth = None
        if keys is not None:
            if clients is None:
                raise ValueError("a CURVE controller needs the public keys of the clients it admits")
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(ctx)
            self._auth.start()
            self._auth.configure_curve_callback("*", credentials_provider=_AllowList(clients))
        self.telemetry = ctx.socket(zmq.SUB)
        self.decisions = ctx.socket(zmq.XPUB)
        try:
            _secure(self.telemetry, keys, server=True)
            self.telemetry.setsockopt(zmq.SUBSCRIBE, TELEMETRY_TOPIC)
            self.telemetry.bind(telemetry_endpoint)
            _secure(self.decisions, keys, server=True)
            self.decisions.setsockopt(zmq.XPUB_VERBOSE, 1)  # see every subscription, not only the first
            self.decisions.bind(decision_endpoint)
        except BaseException:  # an endpoint refused: close what was made, or ctx.term() waits forever
            self.close()
            raise
        self._poller = zmq.Poller()
        self._poller.register(self.telemetry, zmq.POLLIN)
        self._poller.register(self.decisions, zmq.POLLIN)
        self.current: dict[str, telemetry_pb2.Decision] = {}
        self.subscriptions = 0
        self.malformed = 0
        self._lock = threading.Lock()

    @property
    def telemetry_endpoint(self) -> str:
        return self.telemetry.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def decision_endpoint(self) -> str:
        return self.decisions.getsockopt_string(zmq.LAST_ENDPOINT)

    def _send(self, msg: telemetry_pb2.Decision) -> None:
        self.decisions.send_multipart([decision_topic(msg.device), msg.SerializeToString()])

    def publish_decision(self, msg: telemetry_pb2.Decision) -> None:
        with self._lock:
            self.current[msg.device] = msg
            self._send(msg)

    def forget(self, device: str) -> None:
        """Stop repeating the decision for ``device`` (the controller forgot it)."""
        with self._lock:
            self.current.pop(device, None)

    def republish(self) -> None:
        """Send every current decision again (the heartbeat)."""
        with self._lock:
            for msg in self.current.values():
                self._send(msg)

    def poll(self, timeout_s: float, max_batch: int = MAX_BATCH) -> list[telemetry_pb2.Telemetry]:
        """Serve new subscriptions and return the telemetry that arrived within ``timeout_s``:
        at most ``max_batch`` messages read from each socket, and of each source only the
        latest (what a policy decides on; older ones from the same poll are superseded)."""
        latest: dict[str, telemetry_pb2.Telemetry] = {}
        for sock, _ in self._poller.poll(int(timeout_s * 1000)):
            for _ in range(max_batch):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if sock is self.decisions:
                    self._subscribed(frames)
                else:
                    msg = self._parse_telemetry(frames)
                    if msg is not None:
                        latest.pop(msg.source, None)  # re-inserted last: arrival order kept
                        latest[msg.source] = msg
        return list(latest.values())

    def _subscribed(self, frames: list[bytes]) -> None:
        frame = frames[0] if frames else b""
        if frame[:1] != b"\x01":
            return  # an unsubscription
        self.subscriptions += 1
        topic = frame[1:]
        if not (topic.startswith(DECISION_PREFIX) and topic.endswith(TOPIC_END)):
            return  # a prefix subscription (a device of an older edgesplit, or a snooper): no replay
        device = topic[len(DECISION_PREFIX):-len(TOPIC_END)].decode(errors="replace")
        with self._lock:
            current = self.current.get(device)
            if current is not None:  # the late joiner gets the decision in force at once
                self._send(current)

    def _parse_telemetry(self, frames: list[bytes]) -> telemetry_pb2.Telemetry | None:
        if len(frames) != 2 or frames[0] != TELEMETRY_TOPIC:
            self.malformed += 1
            return None
        msg = telemetry_pb2.Telemetry()
        try:
            msg.ParseFromString(frames[1])
        except Exception:  # protobuf raises DecodeError, sometimes others on garbage
            self.malformed += 1
            return None
        return msg

    def close(self) -> None:
        self.telemetry.close()
        self.decisions.close()
        if self._auth is not None:
            self._auth.stop()


class TelemetryPublisher:
    """A process's end for telemetry: connect and publish (sequence numbers per source)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, source: str, keys: CurveKeys | None = None) -> None:
        self.source = source
        self.sock = ctx.socket(zmq.PUB)
        _secure(self.sock, keys, server=False)
        self.sock.connect(endpoint)
        self.seq = 0

    def publish(self, msg: telemetry_pb2.Telemetry) -> None:
        self.seq += 1
        msg.source, msg.seq = self.source, self.seq
        if not msg.time:
            msg.time = time.time()
        self.sock.send_multipart([TELEMETRY_TOPIC, msg.SerializeToString()])

    def close(self) -> None:
        self.sock.close()


class DecisionSubscriber:
    """A device's end for decisions: the ones for this device, parsed, malformed ones counted."""

    def __init__(self, ctx: zmq.Context, endpoint: str, device: str, keys: CurveKeys | None = None) -> None:
        self.device = device
        self.topic = decision_topic(device)
        self._ctx, self._endpoint, self._keys = ctx, endpoint, keys
        self.sock = self._connect()
        self.malformed = 0

    def _connect(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.SUB)
        _secure(sock, self._keys, server=False)
        sock.setsockopt(zmq.SUBSCRIBE, self.topic)
        sock.connect(self._endpoint)
        return sock

    def reconnect(self) -> None:
        """Replace the socket with a fresh one (from the thread that receives)."""
        self.sock.close()
        self.sock = self._connect()

    def receive(self, timeout_s: float) -> telemetry_pb2.Decision | None:
        """The next valid decision for this device within ``timeout_s``, else None."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000)):
                return None
            frames = self.sock.recv_multipart()
            if len(frames) != 2 or frames[0] != self.topic:
                self.malformed += 1
                continue
            msg = telemetry_pb2.Decision()
            try:
                msg.ParseFromString(frames[1])
            except Exception:
                self.malformed += 1
                continue
            if msg.device != self.device or msg.cut < 0:
                self.malformed += 1
                continue
            return msg

    def close(self) -> None:
        self.sock.close()


def wait_for_subscribers(hub: ControllerSockets, *subscribers: DecisionSubscriber, timeout_s: float = 5.0) -> None:
    """Serve ``hub`` until it has seen as many subscriptions as ``subscribers`` (ZeroMQ's slow joiner)."""
    deadline = time.monotonic() + timeout_s
    while hub.subscriptions < len(subscribers):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{hub.subscriptions} of {len(subscribers)} subscribers joined in {timeout_s} s")
        hub.poll(0.05)
