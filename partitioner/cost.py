"""Cost model: predicted end-to-end latency and device energy of a cut, from two profiles and a link.

For cut ``k`` and codec ``c``: latency = device time of the head (device profile) + transfer
((bytes(k, c) + answer bytes) x framing / bandwidth + RTT) + edge time of the tail (edge
profile); all on the device (the last cut) sends nothing. Framing is what Ethernet, IP and
TCP headers add to a full segment (1514 bytes on the wire per 1448 of payload). Where the
profiles measured them, encoding on the device and decoding on the edge are charged per
element that crosses. Cut 0 sends the input as a real client would: uint8 pixels
(one byte per element), not float32. Device energy = compute time x compute power +
transfer time x radio power, with the radio's power linear in throughput (Huang et al.,
MobiSys 2012, as Neurosurgeon uses it).

Example::

    >>> link = Link(bandwidth_mbit=8.0, rtt_s=0.02)
    >>> round(link.transfer_seconds(100_000), 4)   # 100 kB x 1514/1448 at 8 Mbit/s + 20 ms
    0.1246
    >>> round(PI4.energy_joules(compute_s=0.1, transfer_s=0.12, link=link), 2)
    0.66
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .cuts import GraphCut
from .profile import Profile

# Bytes per element on the wire, per codec (int8-channel adds 8 bytes per channel).
CODEC_BYTES = {"fp32": 4, "fp16": 2, "int8": 1, "int8-channel": 1}
INPUT_BYTES_PER_ELEMENT = 1  # cut 0: the image as uint8 pixels
ANSWER_BYTES_PER_ELEMENT = 4  # the edge answers the model's output as float32
FRAMING = 1514 / 1448  # bytes on an Ethernet link per byte of TCP payload in full segments


@dataclass(frozen=True)
class Link:
    """Bandwidth (Mbit/s) and round-trip time (s) between device and edge."""

    bandwidth_mbit: float
    rtt_s: float = 0.02
    technology: str = "wifi"  # radio power model: "wifi", "lte" or "3g"
    framing: float = FRAMING
    burst_bytes: int = 0  # a token-bucket shaper (tbf) lets this much through at line rate after idling

    def transfer_seconds(self, nbytes: int, answer_bytes: int = 0) -> float:
        """Time to send ``nbytes`` and receive ``answer_bytes`` back (nothing sent: no time at all)."""
        if nbytes <= 0:
            return 0.0
        wire = [max(0.0, n * self.framing - self.burst_bytes) for n in (nbytes, answer_bytes)]
        return sum(wire) * 8 / (self.bandwidth_mbit * 1e6) + self.rtt_s


# Uplink radio power = alpha * throughput (Mbit/s) + beta, in watts: Huang et al., "A close
# examination of performance and power characteristics of 4G LTE networks", MobiSys 2012.
RADIO_UPLINK_W = {"wifi": (0.28317, 0.13286), "lte": (0.43839, 1.28804), "3g": (0.86898, 0.81788)}


@dataclass(frozen=True)
class DevicePower:
    """Power of a device class: compute (all cores busy minus idle) and the radio model."""

    name: str
    compute_w: float

    def energy_joules(self, compute_s: float, transfer_s: float, link: Link) -> float:
        alpha, beta = RADIO_UPLINK_W[link.technology]
        radio_w = alpha * link.bandwidth_mbit + beta
        return compute_s * self.compute_w + transfer_s * radio_w


# Raspberry Pi 4: about 2.7 W idle and 6.4 W with all four cores busy at the USB supply.
PI4 = DevicePower("pi4", compute_w=6.4 - 2.7)


def cut_bytes(cut: GraphCut, codec: str, last: int) -> int:
    """Wire bytes for the tensors crossing ``cut`` under ``codec`` (0 for the all-device cut)."""
    if cut.index == last:
        return 0
    elements = [math.prod(s) for s in cut.crossing_shapes]
    if cut.index == 0:
        return sum(elements) * INPUT_BYTES_PER_ELEMENT
    size = sum(elements) * CODEC_BYTES[codec]
    if codec == "int8-channel":
        size += sum(8 * s[1] for s in cut.crossing_shapes if len(s) > 1)
    return size


@dataclass(frozen=True)
class Prediction:
    """Predicted cost of one cut."""

    cut: int
    codec: str
    device_s: float
    transfer_s: float
    edge_s: float
    bytes: int
    energy_j: float

    @property
    def total_s(self) -> float:
        return self.device_s + self.transfer_s + self.edge_s


@dataclass(frozen=True)
class Exit:
    """An early exit on the device, read at graph cut ``cut``.

    ``rate`` is the share of all inputs that stop there (confident enough, and not stopped
    by an earlier exit), ``seconds`` the time of its head on the device. An exit only runs
    where the device holds its cut: for a plan cut at ``k``, the exits at cuts ``<= k``.
    """

    cut: int
    rate: float
    seconds: float = 0.0


def _check_exits(exits: Sequence[Exit]) -> list[Exit]:
    exits = sorted(exits, key=lambda e: e.cut)
    if any(not 0.0 <= e.rate <= 1.0 or e.seconds < 0 for e in exits):
        raise ValueError(f"exit rates must be within 0..1 and seconds >= 0: {exits}")
    if sum(e.rate for e in exits) > 1.0 + 1e-9:
        raise ValueError(f"exit rates add up to {sum(e.rate for e in exits):.3f}: more than every input")
    return exits


def predict(cuts: list[GraphCut], device: Profile, edge: Profile, link: Link, codec: str = "int8",
            power: DevicePower = PI4, batch: int = 1, exits: Sequence[Exit] = ()) -> list[Prediction]:
    """Predicted latency and device energy of every transferable cut (expected values with exits).

    With early exits (BranchyNet, Edgent), an input leaving at an exit the head holds pays
    the device time up to that exit plus the exit heads on the way, and nothing else; the
    rest pay the whole head, every exit head it holds, the transfer and the tail. Each
    component is the expectation over inputs, weighted by the exit rates.
    """
    exits = _check_exits(exits)
    last = cuts[-1].index
    answer = sum(math.prod(s) for s in cuts[-1].crossing_shapes) * ANSWER_BYTES_PER_ELEMENT * batch
    out = []
    for cut in cuts:
        if not cut.transferable and cut.index != last:
            continue
        device_s = device.segment_seconds(0, cut.index, batch)
        edge_s = edge.segment_seconds(cut.index, last, batch)
        nbytes = cut_bytes(cut, codec, last) * batch
        if nbytes:
            elements = batch * sum(math.prod(s) for s in cut.crossing_shapes)
            device_s += elements * device.encode_seconds_per_element
            edge_s += elements * edge.decode_seconds_per_element
        transfer_s = link.transfer_seconds(nbytes, answer if nbytes else 0)
        held = [e for e in exits if e.cut <= cut.index]
        if held:
            stays = 1.0 - sum(e.rate for e in held)
            early, heads = 0.0, 0.0
            for e in held:
                heads += e.seconds
                early += e.rate * (device.segment_seconds(0, e.cut, batch) + heads)
            device_s = early + stays * (device_s + heads)
            transfer_s *= stays
            edge_s *= stays
        out.append(Prediction(cut.index, codec, device_s, transfer_s, edge_s, nbytes,
                              power.energy_joules(device_s, transfer_s, link)))
    return out
