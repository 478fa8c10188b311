"""Cost model: predicted end-to-end latency and device energy of a cut, from two profiles and a link.

For cut ``k`` and codec ``c``: latency = device time of the head (device profile) + transfer
(bytes(k, c) / bandwidth + RTT) + edge time of the tail (edge profile); all on the device
(the last cut) sends nothing. Cut 0 sends the input as a real client would: uint8 pixels
(one byte per element), not float32. Device energy = compute time x compute power +
transfer time x radio power, with the radio's power linear in throughput (Huang et al.,
MobiSys 2012, as Neurosurgeon uses it).

Example::

    >>> link = Link(bandwidth_mbit=8.0, rtt_s=0.02)
    >>> round(link.transfer_seconds(100_000), 3)
    0.12
    >>> round(PI4.energy_joules(compute_s=0.1, transfer_s=0.12, link=link), 2)
    0.66
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .cuts import GraphCut
from .profile import Profile

# Bytes per element on the wire, per codec (int8-channel adds 8 bytes per channel).
CODEC_BYTES = {"fp32": 4, "fp16": 2, "int8": 1, "int8-channel": 1}
INPUT_BYTES_PER_ELEMENT = 1  # cut 0: the image as uint8 pixels


@dataclass(frozen=True)
class Link:
    """Bandwidth (Mbit/s) and round-trip time (s) between device and edge."""

    bandwidth_mbit: float
    rtt_s: float = 0.02
    technology: str = "wifi"  # radio power model: "wifi", "lte" or "3g"

    def transfer_seconds(self, nbytes: int) -> float:
        """Time to send ``nbytes`` and get a small answer back (0 bytes: no transfer at all)."""
        if nbytes <= 0:
            return 0.0
        return nbytes * 8 / (self.bandwidth_mbit * 1e6) + self.rtt_s


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


def predict(cuts: list[GraphCut], device: Profile, edge: Profile, link: Link, codec: str = "int8",
            power: DevicePower = PI4, batch: int = 1) -> list[Prediction]:
    """Predicted latency and device energy of every transferable cut."""
    last = cuts[-1].index
    out = []
    for cut in cuts:
        if not cut.transferable and cut.index != last:
            continue
        device_s = device.segment_seconds(0, cut.index, batch)
        edge_s = edge.segment_seconds(cut.index, last, batch)
        nbytes = cut_bytes(cut, codec, last)
        transfer_s = link.transfer_seconds(nbytes)
        out.append(Prediction(cut.index, codec, device_s, transfer_s, edge_s, nbytes,
                              power.energy_joules(device_s, transfer_s, link)))
    return out
