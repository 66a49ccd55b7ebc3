"""Post-processing against the reference frames; mp4/sidecar writing, atomicity, output path checks."""
import json
import os
import struct
import subprocess
import sys

import imageio.v2 as imageio
import imageio_ffmpeg
import numpy as np
import pytest
import torch

from conftest import read_io
from lowvram_stepvideo.files import video as video_mod
from lowvram_stepvideo.files.video import (
    VideoError,
    crop_540p,
    output_path_error,
    postprocess,
    sidecar_path,
    to_uint8_frames,
    write_mp4,
    write_sidecar)


def test_postprocess_matches_reference_frames(fixture_dir):
    io, _ = read_io(fixture_dir / "pipeline_io.safetensors")
    frames = postprocess(io["vae.out.video"])
    ref = io["out.frames_uint8"].numpy()
    assert frames.dtype == np.uint8 and frames.shape == ref.shape
    assert np.abs(frames.astype(np.int16) - ref.astype(np.int16)).max() <= 1


def test_to_uint8_truncates_and_computes_in_video_dtype():
    values = torch.tensor([-2.0, -1.0, 0.0, 0.5, 0.99, 1.0, 3.0, 0.57578125])
    video = values.reshape(1, 1, 1, 1, 8).expand(1, 1, 3, 1, 8).contiguous()
    got = to_uint8_frames(video)[0, 0, :, 0]
    # float32: (x+1)*127.5 = 0, 0, 127.5, 191.25, 253.725, 255, 255, 200.91... -> truncated
    assert got.tolist() == [0, 0, 127, 191, 253, 255, 255, 200]
    got_bf16 = to_uint8_frames(video.to(torch.bfloat16))[0, 0, :, 0]
    # bf16: 0.99 -> 0.98828125; +1 -> 1.984375 (bf16); *127.5 = 253.0078 -> 253 (bf16) -> 253
    # 0.57578125 + 1 = 1.57578125 -> 1.578125 (bf16); *127.5 = 201.21 -> 201 (bf16) -> 201
    assert got_bf16.tolist() == [0, 0, 127, 191, 253, 255, 255, 201]


def test_batch_is_stacked_along_height():
    video = torch.rand(2, 3, 3, 4, 5) * 2 - 1  # (B, T, 3, H, W)
    frames = to_uint8_frames(video)
    assert frames.shape == (3, 8, 5, 3)
    assert np.array_equal(frames[:, :4], to_uint8_frames(video[:1]))
    assert np.array_equal(frames[:, 4:], to_uint8_frames(video[1:]))


def test_postprocess_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, W\)"):
        postprocess(torch.zeros(1, 3, 4, 4))


def _grid(h, w):
    """Frames whose pixels encode their own (row, col): channel 0 = row, channel 1 = col."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([rows, cols, np.zeros_like(rows)], axis=-1)[None]  # (1, H, W, 3)


@pytest.mark.parametrize("h, w, rows, cols", [
    (544, 992, (2, 542), (16, 976)),     # release landscape: rows 2..541, cols 16..975
    (992, 544, (16, 976), (2, 542)),     # portrait
    (540, 960, (0, 540), (0, 960)),
    (528, 960, (522, 528), (0, 960)),    # quirk: negative start counts from the end -> 6 x 960
    (200, 400, (30, 200), (120, 400)),   # quirk: 170 x 280
    (180, 320, (0, 180), (0, 320)),      # small: uncropped
    (32, 48, (0, 32), (0, 48)),
    (768, 768, (0, 768), (0, 768)),      # square: unchanged
    (1088, 1088, (0, 1088), (0, 1088)),  # square, even when large
    (768, 1360, (114, 654), (200, 1160)),
])
def test_crop_540p(h, w, rows, cols):
    out = crop_540p(_grid(h, w))
    assert out.shape == (1, rows[1] - rows[0], cols[1] - cols[0], 3)
    assert out[0, 0, 0, :2].tolist() == [rows[0], cols[0]]
    assert out[0, -1, -1, :2].tolist() == [rows[1] - 1, cols[1] - 1]


def _smooth_frames(t=5, h=32, w=48):
    y, x = np.mgrid[0:h, 0:w]
    frames = [np.stack([(x * 4 + i * 10) % 256, (y * 6) % 256, np.full_like(x, 128)], -1) for i in range(t)]
    return np.asarray(frames, dtype=np.uint8)  # (T, H, W, 3)


def _read_back(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]
    return meta, np.asarray(frames)


@pytest.mark.parametrize("denoise", [True, False])
def test_write_mp4_round_trip(tmp_path, denoise):
    frames = _smooth_frames()
    path = tmp_path / "clip.mp4"
    info = write_mp4(frames, path, fps=25, crf=25, denoise=denoise)
    assert info == {"path": str(path), "frames": 5, "width": 48, "height": 32, "fps": 25, "padded": False}
    meta, back = _read_back(path)
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p") and meta["fps"] == 25
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 6
    reader = imageio.get_reader(path)  # and imageio itself reads it
    assert reader.count_frames() == 5 and reader.get_meta_data()["size"] == (48, 32)
    reader.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no temp file left behind


def _top_level_boxes(path) -> list[str]:
    """Types of the top-level ISO-BMFF boxes of an mp4, in file order."""
    data, pos, boxes = path.read_bytes(), 0, []
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if size == 1:                                   # 64-bit size follows the type
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
        boxes.append(kind.decode("latin-1"))
        pos += size if size else len(data)
    return boxes


def test_write_mp4_is_fast_start(tmp_path):
    write_mp4(_smooth_frames(t=30), tmp_path / "clip.mp4")
    boxes = _top_level_boxes(tmp_path / "clip.mp4")
    assert "moov" in boxes and "mdat" in boxes
    assert boxes.index("moov") < boxes.index("mdat"), boxes   # index first: plays while it downloads


def test_write_mp4_pads_odd_sizes(tmp_path):
    frames = _smooth_frames(t=3, h=31, w=47)
    info = write_mp4(iter(list(frames)), tmp_path / "odd.mp4")  # an iterable of frames works too
    assert (info["width"], info["height"], info["padded"], info["frames"]) == (48, 32, True, 3)
    meta, back = _read_back(tmp_path / "odd.mp4")
    assert meta["size"] == (48, 32) and back.shape == (3, 32, 48, 3)
    assert np.abs(back[:, :31, :47].astype(int) - frames.astype(int)).mean() < 6


def test_write_mp4_accepts_postprocessed_tensor_frames(tmp_path, fixture_dir):
    io, meta = read_io(fixture_dir / "pipeline_io.safetensors")
    info = write_mp4(io["out.frames_uint8"], tmp_path / "ref.mp4")
    written = json.loads(meta["mp4_written"])  # what the reference wrote for the same frames
    assert [info["width"], info["height"]] == written["size"]
    out_meta, back = _read_back(tmp_path / "ref.mp4")
    assert out_meta["fps"] == written["fps"] and out_meta["codec"] == written["codec"]
    assert out_meta["pix_fmt"] == written["pix_fmt"] and len(back) == io["out.frames_uint8"].shape[0]


def test_failed_write_leaves_nothing(tmp_path):
    frames = list(_smooth_frames(t=4))
    frames[2] = frames[2][:, :-2]  # a wrong-sized frame in the middle of the stream
    path = tmp_path / "broken.mp4"
    with pytest.raises(ValueError, match="uint8 arrays of shape"):
        write_mp4(frames, path)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "keep.mp4"
    path.write_bytes(b"previous")
    with pytest.raises(ValueError):
        write_mp4([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)], path)
    assert path.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["keep.mp4"]


def test_encoder_failure_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def failing_writer(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        yield
        raise OSError("[Errno 32] Broken pipe\n\nFFMPEG COMMAND: ...")
    monkeypatch.setattr(video_mod.imageio_ffmpeg, "write_frames", failing_writer)
    path = tmp_path / "fail.mp4"
    with pytest.raises(VideoError) as err:
        write_mp4(_smooth_frames(t=3), path)
    assert "\n" not in str(err.value) and "Broken pipe" in str(err.value) and str(path) in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_ffmpeg_rejecting_settings_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(video_mod, "REFERENCE_DENOISE", "no_such_filter")
    with pytest.raises(VideoError, match="could not write"):
        write_mp4(_smooth_frames(t=3), tmp_path / "x.mp4")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs", [{"crf": 60}, {"fps": 0}, {"crf": 2.5}])
def test_write_mp4_rejects_bad_settings(tmp_path, kwargs):
    with pytest.raises(ValueError, match="out of range"):
        write_mp4(_smooth_frames(t=1), tmp_path / "x.mp4", **kwargs)
    with pytest.raises(ValueError, match="no frames"):
        write_mp4(np.zeros((0, 8, 8, 3), np.uint8), tmp_path / "x.mp4")


def test_sidecar_round_trip(tmp_path):
    video_path = tmp_path / "out.mp4"
    data = {"prompt": "一名宇航员 on the moon", "seed": 42, "steps": 30, "shift": 13.0, "model": tmp_path,
            "nested": {"tiles": [17, 31]}}
    path = write_sidecar(sidecar_path(video_path), data)
    assert path == tmp_path / "out.mp4.json"
    back = json.loads(path.read_text(encoding="utf-8"))
    assert back == {**data, "model": str(tmp_path)}
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4.json"]
    loop = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match="Circular"):
        write_sidecar(path, loop)
    assert json.loads(path.read_text(encoding="utf-8")) == back  # failed rewrite leaves the old file
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4.json"]


def test_output_path_ok_and_create_dirs(tmp_path):
    assert output_path_error(tmp_path / "a.mp4") is None
    nested = tmp_path / "x" / "y" / "a.mp4"
    assert "does not exist" in output_path_error(nested)
    assert output_path_error(nested, create_dirs=True) is None and nested.parent.is_dir()
    assert list(nested.parent.iterdir()) == []  # the probe file is gone


def test_output_path_errors_are_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for path, create in [(blocker / "a.mp4", False), (blocker / "sub" / "a.mp4", True), (tmp_path, False)]:
        msg = output_path_error(path, create_dirs=create)
        assert msg and "\n" not in msg and "cannot" in msg
    assert "is a file" in output_path_error(blocker / "a.mp4")


def test_output_path_unwritable_probe(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(video_mod.tempfile, "mkstemp", denied)
    msg = output_path_error(tmp_path / "a.mp4")
    assert msg == f"cannot write {tmp_path / 'a.mp4'}: {tmp_path} is not writable (Permission denied); " \
                  "choose another --output"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc (a folder nobody can write)")
def test_output_path_unwritable_real_folder():
    msg = output_path_error("/proc/self/out.mp4")
    assert msg and "\n" not in msg and "cannot write" in msg


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write to read-only folders")
def test_output_path_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert "cannot write" in output_path_error(folder / "a.mp4")
    finally:
        folder.chmod(0o755)


# ---------------------------------------------------------------- host RAM estimates for memory plans

HOST_RAM_SCRIPT = """
import json, resource, sys, torch
from pathlib import Path
from lowvram_stepvideo.files.video import postprocess, write_mp4

def status_bytes(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

f, h, w = {frames}, {height}, {width}
video = (torch.rand(1, f, 3, h, w) * 2 - 1).to(torch.bfloat16)
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
before = status_bytes("VmRSS")
frames = postprocess(video)
post = status_bytes("VmHWM") - before + video.numel() * video.element_size()
write_mp4(frames[:17], Path({out!r}))   # 17 frames: quicker, and ffmpeg's own memory dominates
ffmpeg = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({{"postprocess": post, "ffmpeg": ffmpeg}}))
"""


@pytest.mark.slow
def test_host_ram_estimates_cover_postprocess_and_writer(tmp_path):
    """The decoded-video and mp4-writer estimates a memory plan uses, against this machine: postprocess's peak RSS
    (plus the decoded video it starts from) and ffmpeg's peak RSS, in a fresh process."""
    f, h, w = 34, 256, 448
    code = HOST_RAM_SCRIPT.format(frames=f, height=h, width=w, out=str(tmp_path / "clip.mp4"))
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.splitlines()[-1])
    decoded = video_mod.decoded_video_host_bytes(f, h, w, torch.bfloat16)
    writer = video_mod.mp4_writer_host_bytes(17, h, w)
    print({"measured": measured, "decoded_estimate": decoded, "writer_estimate": writer})
    assert 0.8 * decoded <= measured["postprocess"] <= decoded
    # ffmpeg's constants were measured on 2 vCPUs; x264 runs more threads on more cores, hence the slack
    assert 0.5 * writer <= measured["ffmpeg"] <= 1.25 * writer


def test_written_frame_shape_follows_crop_and_padding():
    assert video_mod.written_frame_shape(544, 992) == (540, 960)
    assert video_mod.written_frame_shape(64, 97) == (64, 98)
    assert video_mod.written_frame_shape(768, 768) == (768, 768)
