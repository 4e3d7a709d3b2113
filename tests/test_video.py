"""Video in and out (issue 24): a video file or a folder of frames predicted into an H.264 MP4
whose every frame is that frame's overlay, streamed (nothing piles up), written atomically;
the export stage renders export.sequence; bad inputs are one-line errors leaving no file."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import yaml
from PIL import Image

from fcn.checkpoint import best_path
from fcn.cityscapes.layout import SEQUENCE
from fcn.errors import ParamsError
from fcn.images import read_rgb
from fcn.params import ExportParams, default_params_dict, load_params, parse_params
from fcn.predict.export import VIDEO_GAP, ExportPaths, export_stage, render_video
from fcn.predict.predictor import Predictor
from fcn.predict.visualize import blend, colorize
from fcn.stage import run_stage
from fcn.synthetic import synthesize
from fcn.video import (CITYSCAPES_FPS, DEFAULT_CRF, FrameSource, Mp4Writer, frame_files,
                       open_frames)
from helpers.eval_data import predict_in_process as predict
from helpers.tiny import TINY, with_changes

FRAMES = 6
SYNTH = with_changes(TINY, seed=3, sequence_frames=FRAMES, train_per_city=1, val_per_city=1,
                     test_per_city=1, train_extra_cities=[], coarse=False)
"""A small dataset (64x128) with a 6-frame synthetic sequence in frankfurt."""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("video") / "cityscapes"
    synthesize(root, SYNTH)
    return root


@pytest.fixture(scope="module")
def sequence(dataset) -> Path:
    return dataset / SEQUENCE / "val" / SYNTH.val_cities[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random FCN8s whose zero-initialised score weights are random too, so its predictions
    vary from pixel to pixel and frame to frame (untrained: it predicts one class)."""
    import torch

    from helpers.eval_data import save_checkpoint
    from fcn.model import FCN8s

    torch.manual_seed(0)
    model = FCN8s("vgg11_bn", 19).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1 and not parameter.any():
                parameter.normal_(0, 0.05)
    return save_checkpoint(tmp_path_factory.mktemp("model") / "best.pt", model)


@pytest.fixture(scope="module")
def predictor(checkpoint) -> Predictor:
    """The predictor fcn-predict and the export stage build by default (on the CPU)."""
    return Predictor.from_params(checkpoint, None, ExportParams(device="cpu"))


def decode(path: Path) -> tuple[list[np.ndarray], Fraction, str]:
    """Every frame of an MP4 (RGB), its frame rate and codec, read back with PyAV."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, stream.average_rate, stream.codec_context.name


def overlays(predictor: Predictor, images: list[np.ndarray], beside: bool = False
             ) -> list[np.ndarray]:
    """The exact frames a prediction video should show, from the predictor's own labels."""
    labels = predictor(np.stack(images))
    assert len(np.unique(labels)) > 3  # a prediction worth drawing
    out = [blend(image, colorize(label), ExportParams().overlay_alpha)
           for image, label in zip(images, labels)]
    if beside:
        gap = np.full((images[0].shape[0], VIDEO_GAP, 3), 255, np.uint8)
        out = [np.concatenate([image, gap, o], axis=1) for image, o in zip(images, out)]
    return out


def assert_frames_match(decoded: list[np.ndarray], expected: list[np.ndarray],
                        tolerance: float) -> None:
    """Same count and size; each decoded frame close to its own expected frame (H.264 is
    lossy) and closer to it than to any other frame's: content and order both right."""
    assert len(decoded) == len(expected)
    assert {d.shape for d in decoded} == {expected[0].shape}
    distance = np.array([[np.abs(d.astype(np.int16) - e).mean() for e in expected]
                         for d in decoded])
    assert distance.diagonal().max() < tolerance, distance.diagonal()
    assert (distance.argmin(axis=1) == np.arange(len(decoded))).all(), distance


def error_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def write_frames(folder: Path, frames: list[np.ndarray], names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for frame, name in zip(frames, names):
        Image.fromarray(frame).save(folder / name)


# --- reading ----------------------------------------------------------------------------------

def test_frames_are_ordered_by_cityscapes_stem_and_natural_name(tmp_path):
    names = ["frankfurt_000001_000000_leftImg8bit.png", "frankfurt_000000_000294_leftImg8bit.png",
             "frankfurt_000000_000019_leftImg8bit.png", "lindau_000000_000000_leftImg8bit.png"]
    demo = ["stuttgart_00_000000_000010_leftImg8bit.png",  # demoVideo: '_' in the city name
            "stuttgart_00_000000_000009_leftImg8bit.png"]
    plain = ["frame_10.png", "frame_9.png", "frame_100.jpg"]  # string order: 10, 100, 9
    for folder, group in (("cs", names), ("demo", demo), ("plain", plain)):
        write_frames(tmp_path / folder, [np.zeros((8, 8, 3), np.uint8)] * len(group), group)
    assert [p.name for p in frame_files(tmp_path / "cs")] == [names[2], names[1], names[0],
                                                              names[3]]
    assert [p.name for p in frame_files(tmp_path / "demo")] == [demo[1], demo[0]]
    source = open_frames(tmp_path / "plain")
    assert [p.name for p in source.keys()] == ["frame_9.png", "frame_10.png", "frame_100.jpg"]
    assert (source.width, source.height, source.count, source.fps) == (8, 8, 3, None)


# --- writing and predicting -------------------------------------------------------------------

def test_folder_to_mp4_shows_each_frames_overlay_beside_its_input(checkpoint, predictor,
                                                                  sequence, tmp_path):
    out = tmp_path / "out" / "video.mp4"
    assert predict(checkpoint, str(sequence), str(out), "--side-by-side", "--crf", "10",
                   "--batch-size", "4") == 0
    frames, fps, codec = decode(out)
    images = [read_rgb(p) for p in frame_files(sequence)]
    assert (fps, codec) == (17, "h264")  # a folder: Cityscapes' 17 Hz, export.video_fps's default
    assert ExportParams().video_fps == CITYSCAPES_FPS and ExportParams().video_crf == DEFAULT_CRF
    assert frames[0].shape == (64, 2 * 128 + VIDEO_GAP, 3)
    expected = overlays(predictor, images, beside=True)
    assert_frames_match(frames, expected, tolerance=8)
    with Mp4Writer(tmp_path / "expected.mp4", 2 * 128 + VIDEO_GAP, 64, 17, crf=10) as writer:
        for frame in expected:  # the very frames the encoder was given: the same bytes
            writer.write(frame)
    assert (tmp_path / "expected.mp4").read_bytes() == out.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["video.mp4"]  # no temporary file


def test_video_file_to_mp4_keeps_its_rate_and_matches_each_frames_overlay(
        checkpoint, predictor, sequence, tmp_path):
    clip = tmp_path / "clip.mp4"
    with Mp4Writer(clip, 128, 64, Fraction(30000, 1001), crf=10) as writer:
        for image in open_frames(sequence):
            writer.write(image)
    inputs, rate, _ = decode(clip)  # what the predictor sees: the decoded input
    assert len(inputs) == FRAMES and rate == Fraction(30000, 1001)
    out = tmp_path / "predicted.MP4"
    assert predict(checkpoint, str(clip), str(out), "--crf", "10") == 0
    frames, fps, codec = decode(out)
    assert (fps, codec) == (Fraction(30000, 1001), "h264")
    assert_frames_match(frames, overlays(predictor, inputs), tolerance=8)
    assert predict(checkpoint, str(clip), str(tmp_path / "slow.mp4"), "--fps", "5") == 0
    assert decode(tmp_path / "slow.mp4")[1] == 5


def test_same_frames_same_bytes_and_odd_sizes_are_padded(tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (31, 45, 3), dtype=np.uint8) for _ in range(5)]
    for name in ("a.mp4", "b.mp4"):
        with Mp4Writer(tmp_path / name, 45, 31, 17) as writer:
            for frame in frames:
                writer.write(frame)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    decoded, _, _ = decode(tmp_path / "a.mp4")
    assert len(decoded) == 5 and decoded[0].shape == (32, 46, 3)  # one row, one column added


class CountingSource(FrameSource):
    """A long tiny video made frame by frame, counting how many frames have been made."""

    def __init__(self, count: int) -> None:
        super().__init__(Path("counting"), 64, 32, count, None)
        self.made = 0

    def keys(self) -> Iterator[int]:
        for index in range(self.count):
            self.made += 1
            yield index

    def load(self, key: int) -> np.ndarray:
        return np.full((32, 64, 3), key % 256, np.uint8)


def test_frames_stream_through_without_piling_up(predictor, tmp_path, monkeypatch):
    """Each frame is made only a bounded number of frames ahead of the one being written:
    memory does not grow with the video's length."""
    source, ahead = CountingSource(48), []
    write = Mp4Writer.write

    def counting_write(self, frame):
        ahead.append(source.made - self.frames)
        write(self, frame)

    monkeypatch.setattr(Mp4Writer, "write", counting_write)
    params = dataclasses.replace(ExportParams(), batch_size=4, workers=2)
    assert render_video(predictor, source, tmp_path / "long.mp4", params, 17) == 48
    assert len(ahead) == 48 and max(ahead) <= 4 + 6 + 1  # a batch + read-ahead depth
    assert len(decode(tmp_path / "long.mp4")[0]) == 48


def test_without_libx264_mpeg4_is_written_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("fcn.video.ENCODERS", ("no-such-encoder", "mpeg4"))
    with caplog.at_level(logging.WARNING), Mp4Writer(tmp_path / "m.mp4", 64, 32, 17) as writer:
        for value in (0, 100, 200):
            writer.write(np.full((32, 64, 3), value, np.uint8))
    assert "no no-such-encoder encoder: writing mpeg4 instead" in caplog.text
    frames, _, codec = decode(tmp_path / "m.mp4")
    assert codec == "mpeg4" and [round(f.mean() / 10) for f in frames] == [0, 10, 20]


# --- bad input --------------------------------------------------------------------------------

def make_bad_input(case: str, sequence: Path, folder: Path) -> tuple[list[str], str]:
    """(fcn-predict arguments after the checkpoint, the expected error's words)."""
    folder.mkdir()
    files = frame_files(sequence)
    out = str(folder / "out.mp4")
    if case == "mixed sizes":
        write_frames(folder / "frames", [read_rgb(files[0]), np.zeros((64, 126, 3), np.uint8)],
                     ["a_1.png", "a_2.png"])
        return [str(folder / "frames"), out], (f"{folder / 'frames' / 'a_2.png'}: frame is "
                                               "126x64, but the first frame (a_1.png) is 128x64")
    if case == "oversize frame":
        return [str(sequence), out, "--max-pixels", "8191"], (
            f"{files[0]}: frame is 128x64 (8192 pixels), more than the limit of 8191")
    if case == "oversize video":
        with Mp4Writer(folder / "clip.mp4", 128, 64, 17) as writer:
            writer.write(read_rgb(files[0]))
        return [str(folder / "clip.mp4"), out, "--max-pixels", "8191"], (
            f"{folder / 'clip.mp4'}: video frame is 128x64 (8192 pixels), more than the limit")
    if case == "not a video":
        (folder / "notes.txt").write_text("hello")
        return [str(folder / "notes.txt"), out], f"{folder / 'notes.txt'}: not a video file"
    if case == "damaged video":
        (folder / "clip.mp4").write_text("not a video at all")
        return [str(folder / "clip.mp4"), out], f"{folder / 'clip.mp4'}: cannot read video ("
    if case == "missing folder":
        return [str(folder / "nowhere"), out], (f"{folder / 'nowhere'}: video file or folder of "
                                                "frames not found")
    if case == "truncated late frame":  # its header is fine: found while writing the video
        frames = folder / "frames"
        write_frames(frames, [read_rgb(f) for f in files], [f.name for f in files])
        data = (frames / files[-1].name).read_bytes()
        (frames / files[-1].name).write_bytes(data[:len(data) // 2])
        return [str(frames), out], f"{frames / files[-1].name}: cannot read frame ("
    assert case == "video into a folder"
    with Mp4Writer(folder / "clip.mp4", 128, 64, 17) as writer:
        writer.write(read_rgb(files[0]))
    return [str(folder / "clip.mp4"), str(folder / "out")], (
        f"{folder / 'out'}: the input {folder / 'clip.mp4'} is a video, so its predictions are "
        "a video too: give an output path ending in .mp4")


@pytest.mark.parametrize("case", ["mixed sizes", "oversize frame", "oversize video",
                                  "not a video", "damaged video", "missing folder",
                                  "truncated late frame", "video into a folder"])
def test_bad_input_is_one_line_and_leaves_no_file(checkpoint, sequence, tmp_path, caplog,
                                                  case):
    args, words = make_bad_input(case, sequence, tmp_path / "in")
    if case != "truncated late frame":  # found before the model is loaded: none is needed
        checkpoint = tmp_path / "never_loaded.pt"
    assert predict(checkpoint, *args) == 1
    assert len(error_lines(caplog)) == 1 and words in error_lines(caplog)[0], caplog.text
    assert not list(tmp_path.rglob("out*")) and not list(tmp_path.rglob(".*"))


def test_video_options_without_an_mp4_are_refused_before_work(checkpoint, sequence, tmp_path,
                                                              caplog):
    assert predict(checkpoint, str(sequence), str(tmp_path / "out"), "--fps", "10") == 1
    assert error_lines(caplog) == ["--fps, --side-by-side and --crf apply to a video: give an "
                                   "output path ending in .mp4"]
    assert predict(checkpoint, str(sequence), str(tmp_path / "o.mp4"), "--crf", "52") == 1
    assert "export.video_crf: must be <= 51, got 52" in error_lines(caplog)[-1]
    assert not list(tmp_path.iterdir())


# --- the export stage -------------------------------------------------------------------------

def export(tmp_path: Path, dataset: Path, checkpoint: Path, monkeypatch, **export_params
           ) -> int:
    """The export stage as its script runs it (params loaded and checked, run_stage)."""
    raw = default_params_dict()
    raw["data"].update(root=str(dataset), generated=str(tmp_path / "generated"))
    raw["train"]["out"] = str(checkpoint.parent)
    raw["export"].update(overlays=0, gif_frames=0, device="cpu", workers=1,
                         out=str(tmp_path / "predictions"), **export_params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)

    def main() -> None:
        params = load_params("params.yaml")
        export_stage(best_path(params.train.out), params.data.root, params.model, params.export,
                     ExportPaths(Path(params.export.out)), params.data.max_pixels)

    try:
        run_stage(main)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_export_stage_renders_the_sequence_when_asked(checkpoint, predictor, dataset, sequence,
                                                      tmp_path, monkeypatch, caplog):
    assert export(tmp_path, dataset, checkpoint, monkeypatch) == 0
    video = tmp_path / "predictions" / "video"
    assert video.is_dir() and not list(video.iterdir())  # off by default: an empty out
    relative = sequence.relative_to(dataset).as_posix()
    assert export(tmp_path, dataset, checkpoint, monkeypatch, sequence=relative, video_fps=10,
                  video_crf=10) == 0
    frames, fps, codec = decode(video / "sequence.mp4")
    assert (fps, codec) == (10, "h264")
    images = [read_rgb(p) for p in frame_files(sequence)]
    assert_frames_match(frames, overlays(predictor, images), tolerance=8)
    assert sorted(p.name for p in (tmp_path / "predictions" / "test").rglob("*.png"))  # as ever

    before = (video / "sequence.mp4").read_bytes()
    assert export(tmp_path, dataset, checkpoint, monkeypatch,
                  sequence=f"{SEQUENCE}/val/nowhere") == 1
    assert error_lines(caplog) == [
        f"{dataset / SEQUENCE / 'val' / 'nowhere'}: export.sequence '{SEQUENCE}/val/nowhere' "
        f"not found under data.root {dataset}"]
    assert (video / "sequence.mp4").read_bytes() == before  # nothing replaced


@pytest.mark.parametrize("value", ["../elsewhere", "/abs/frames", ""])
def test_a_sequence_outside_data_root_is_an_invalid_parameter(value):
    raw = default_params_dict()
    raw["export"]["sequence"] = value
    with pytest.raises(ParamsError, match="export.sequence: expected a path relative to "
                                          "data.root, without '..'"):
        parse_params(raw)
