"""The tunnel's WebSocket frame tracking and close frames (``lbstack.forwarding.tunnel``)."""

from __future__ import annotations

import os

import pytest

from lbstack.forwarding.tunnel import CLOSE_TO_CLIENT, Frames, close_to_server


def frame(payload: bytes, *, masked: bool) -> bytes:
    """A binary frame as a WebSocket peer would send it."""
    length = len(payload)
    if length < 126:
        head = bytes([0x82, (0x80 if masked else 0) | length])
    elif length < 65536:
        head = bytes([0x82, (0x80 if masked else 0) | 126]) + length.to_bytes(2, "big")
    else:
        head = bytes([0x82, (0x80 if masked else 0) | 127]) + length.to_bytes(8, "big")
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("size", [0, 5, 125, 126, 4000, 65535, 65536, 200_000])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("step", [1, 3, 7, 1000, 1 << 20])
def test_frames_are_tracked_across_any_split(size: int, masked: bool, step: int) -> None:
    stream = frame(b"a" * size, masked=masked) + frame(b"bc", masked=masked)
    frames = Frames()
    boundaries = []
    for at in range(0, len(stream), step):
        frames.feed(stream[at : at + step])
        boundaries.append(frames.between)
    assert frames.between
    first = len(frame(b"a" * size, masked=masked))
    if step < first and size:  # split inside the first frame: not between frames there
        assert not boundaries[0]


def test_the_close_frames_say_going_away_masked_only_toward_the_server() -> None:
    for data, masked in ((CLOSE_TO_CLIENT, False), (close_to_server(), True)):
        assert data[0] == 0x88  # FIN + close
        assert bool(data[1] & 0x80) is masked and data[1] & 0x7F == 2
        payload = data[-2:]
        if masked:
            mask = data[2:6]
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert int.from_bytes(payload, "big") == 1001
        frames = Frames()
        frames.feed(data)
        assert frames.between
