"""The demo scene's Y4M writer (the live page's fake camera)."""

import numpy as np
import pytest

from soundreactor.demo_video import write_y4m


def test_y4m_holds_every_frame_as_bt601_i420(tmp_path):
    gray = np.full((4, 6, 3), 128, np.uint8)
    red = np.zeros((4, 6, 3), np.uint8)
    red[..., 0] = 255
    data = write_y4m(tmp_path / "clip.y4m", [gray, red, gray]).read_bytes()
    header, body = data.split(b"\n", 1)
    assert header == b"YUV4MPEG2 W6 H4 F30:1 Ip A1:1 C420jpeg"
    frames = body.split(b"FRAME\n")[1:]
    assert [len(f) for f in frames] == [4 * 6 + 2 * (2 * 3)] * 3  # Y full size, Cb and Cr at half each side
    y, cb, cr = np.frombuffer(frames[1], np.uint8)[:24], frames[1][24:30], frames[1][30:]
    # BT.601: Y = 0.299 R + 0.587 G + 0.114 B; Cb = 128 + 0.564 (B - Y); Cr = 128 + 0.713 (R - Y), clipped to 255
    assert set(y) == {76} and set(cb) == {85} and set(cr) == {255}
    assert set(frames[0]) == {128}


def test_y4m_refuses_odd_sides(tmp_path):
    with pytest.raises(ValueError, match="even sides"):
        write_y4m(tmp_path / "clip.y4m", [np.zeros((3, 4, 3), np.uint8)])
