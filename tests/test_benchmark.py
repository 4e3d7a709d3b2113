"""fcn.benchmark.run / fcn.benchmark.flops: every configuration reports every field, FLOPs agree with the
analytic count, the fast path keeps fp32's predictions, unsupported precisions are skipped.

Tiny images on CPU; the figures themselves are never asserted (timing is the stage's job).
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
from pathlib import Path

import pytest
import torch

import fcn.benchmark.run as bench
from fcn.benchmark.capability import precision_support
from fcn.benchmark.flops import analytic_flops, counted_flops
from fcn.benchmark.inputs import benchmark_images, predict_classes, to_input, trained_like_model
from fcn.benchmark.plan import Config, plan
from fcn.benchmark.report import markdown_table, write_report
from fcn.benchmark.run import (FIELDS, MIN_AGREEMENT, ConfigResult, benchmark_stage, fastest_config,
                               run_benchmark)
from fcn.benchmark.worker import PeakRss
from fcn.model import FCN8s
from fcn.params import BenchmarkParams, ModelParams, load_params

ROOT = Path(__file__).resolve().parents[1]
TINY = BenchmarkParams(device="cpu", height=64, width=128, precisions=["fp32", "tf32", "bf16"],
                       channels_last=[False, True], quick_warmup=1, quick_iters=2, threads=1,
                       matmul_size=512, window=[32, 64], stride=[24, 48])
NUMBERS = ("latency_ms_median", "latency_ms_p90", "latency_ms_min", "throughput_ips",
           "throughput_ips_load_corrected",
           "first_call_s", "peak_memory_mb", "rss_baseline_mb", "peak_rss_growth_mb",
           "flops_per_image", "achieved_tflops", "matmul_tflops", "matmul_ratio", "utilisation",
           "ceiling_tflops", "agreement")


def _meta_model(**kwargs) -> FCN8s:
    with torch.device("meta"):
        return FCN8s(**kwargs)


# --- FLOPs ---------------------------------------------------------------------------------

def test_analytic_flops_of_vgg11_bn_at_cityscapes_size():
    count = analytic_flops(_meta_model(), 1024, 2048)
    assert count.macs == pytest.approx(316e9, rel=0.01)
    assert count.flops == pytest.approx(632e9, rel=0.01)
    assert count.other_ops < 0.01 * count.flops  # BN/ReLU/pool/adds: reported, not counted
    fc67 = analytic_flops(_meta_model(fc67=True), 1024, 2048)
    assert fc67.macs - count.macs == pytest.approx(245e9, rel=0.01)


@pytest.mark.parametrize("backbone, fc67, height, width", [
    ("vgg11_bn", False, 1024, 2048), ("vgg11_bn", True, 1024, 2048),
    ("vgg16", False, 1000, 1999),  # padded to 1024x2016 inside the model
])
def test_flop_counter_matches_analytic_count(backbone, fc67, height, width):
    counted = counted_flops(ModelParams(backbone=backbone, fc67=fc67), height, width)
    analytic = analytic_flops(_meta_model(backbone=backbone, fc67=fc67), height, width)
    assert counted == pytest.approx(analytic.flops, rel=0.01)


def test_each_arch_costs_what_its_head_adds_and_both_counts_agree_exactly():
    """FCN-32s/16s/8s share the backbone (~632 GFLOPs at 1024x2048 for VGG11-BN); each skip
    adds a 1x1 score layer, an upsampling and an add; the analytic count equals
    FlopCounterMode's to the FLOP for each arch, at an unpadded and a padded size."""
    for height, width in ((1000, 1999), (1024, 2048)):  # the counts of the last size stay
        counts = {}
        for arch in ("fcn32s", "fcn16s", "fcn8s"):
            analytic = analytic_flops(_meta_model(arch=arch), height, width)
            assert counted_flops(ModelParams(arch=arch), height, width) == analytic.flops, arch
            counts[arch] = analytic
    ph, pw = 1024, 2048  # the differences, from the layer shapes: pool4 is 512 channels at /16
    assert counts["fcn16s"].conv_macs - counts["fcn32s"].conv_macs == 19 * 512 * 64 * 128
    assert counts["fcn8s"].conv_macs - counts["fcn16s"].conv_macs == 19 * 256 * 128 * 256
    # transposed: 32s one x32 (k=64) on the /32 map; 16s x2 (k=4) + x16 (k=32); 8s + x2 + x8
    assert counts["fcn32s"].transposed_macs == 19 * 19 * 64 * 64 * (ph // 32) * (pw // 32)
    assert counts["fcn16s"].transposed_macs == 19 * 19 * (4 * 4 * (ph // 32) * (pw // 32)
                                                          + 32 * 32 * (ph // 16) * (pw // 16))
    assert counts["fcn8s"].flops == pytest.approx(632.4e9, rel=1e-3)


def test_flops_scale_with_batch():
    one = counted_flops(ModelParams(), 64, 128)
    assert counted_flops(ModelParams(), 64, 128, batch_size=3) == 3 * one


# --- planning, support, memory ---------------------------------------------------------------

def test_profile_picks_its_own_settings():
    quick, quick_configs = plan(BenchmarkParams(device="cpu"))
    full, full_configs = plan(BenchmarkParams(device="cpu", profile="full"))
    assert (quick.warmup, quick.iters) == (1, 2) and {c.batch_size for c in quick_configs} == {1}
    assert (full.warmup, full.iters) == (10, 50)
    assert {c.compile for c in full_configs} == {False, True}
    assert {c.batch_size for c in full_configs} == {1, 2, 4}


def test_tf32_is_unsupported_on_cpu_with_a_reason():
    reason = precision_support(torch.device("cpu"), "tf32")
    assert reason and "CUDA" in reason
    assert precision_support(torch.device("cpu"), "fp32") is None


@pytest.mark.parametrize("precision, check", [("bf16", "_is_mkldnn_bf16_supported"),
                                              ("fp16", "_is_mkldnn_fp16_supported")])
def test_cpu_low_precision_follows_onednn_capability(precision, check):
    reason = precision_support(torch.device("cpu"), precision)
    native = getattr(torch.ops.mkldnn, check, None)
    if native is None:
        pytest.skip("this torch has no oneDNN capability check")
    assert (reason is None) == bool(native())
    if reason is not None:
        assert "GFLOP/s" in reason and precision in reason


def _touched_mapping(size: int) -> mmap.mmap:
    """Fresh anonymous pages, written: resident whatever the allocator kept from earlier tests
    (a reused heap block already counts in the baseline and would show no growth)."""
    block = mmap.mmap(-1, size)
    block.write(b"\x01" * size)
    return block


def test_peak_rss_sees_an_allocation_and_skips_what_happens_while_disarmed():
    rss = PeakRss()
    rss.reset()
    if rss.method.startswith("ru_maxrss"):
        pytest.skip("no /proc peak reset on this system: the lifetime peak hides later growth")
    block = _touched_mapping(64 * 2**20)
    rss.checkpoint()
    block.close()
    assert rss.growth() >= 60 * 2**20
    rss.reset()
    rss.checkpoint()
    block = _touched_mapping(64 * 2**20)  # between checkpoint and rearm: not counted
    block.close()
    rss.rearm()
    rss.checkpoint()
    assert rss.growth() < 32 * 2**20


# --- a whole tiny run ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("benchmark")
    results = run_benchmark(TINY, ModelParams(), progress=False)
    write_report(results, out / "benchmark.json", out / "details.json", out / "plots")
    results["_out"] = str(out)
    return results


def test_json_has_every_field_for_every_configuration(results):
    out = Path(results["_out"])
    written = json.loads((out / "details.json").read_text())
    expected = {c.name for c in plan(TINY)[1]}
    assert set(written["configs"]) == expected
    for name, entry in written["configs"].items():
        assert tuple(entry) == FIELDS, name
        assert entry["name"] == name and entry["status"] in ("ok", "skipped")
        if entry["status"] == "ok":
            assert entry["reason"] is None
            for key in NUMBERS:
                assert isinstance(entry[key], (int, float)) and math.isfinite(entry[key]), key
            assert entry["latency_ms_p90"] >= entry["latency_ms_median"] >= entry["latency_ms_min"]
            assert entry["memory_method"]
            if entry["mode"] == "whole":
                assert entry["flops_per_image"] == written["model"]["flops_counted"]
            else:  # 9 windows of 32x64 (a quarter of the image each, with overlaps)
                assert entry["flops_per_image"] == 9 * counted_flops(ModelParams(), 32, 64)
        else:
            assert isinstance(entry["reason"], str) and entry["reason"]
            assert all(entry[key] is None for key in NUMBERS)
    for key in ("device", "device_name", "torch", "threads", "cudnn_benchmark", "tf32"):
        assert key in written["environment"]
    assert written["model"]["counted_over_analytic"] == pytest.approx(1, rel=0.01)
    assert (out / "plots" / "benchmark.png").stat().st_size > 0
    rows = (out / "plots" / "configs.csv").read_text().splitlines()
    ok = [e for e in written["configs"].values() if e["status"] == "ok"]
    assert len(rows) == 1 + len(ok)
    assert "skipped" in markdown_table(written)


def test_metrics_hold_the_headline_numbers_of_the_measured_configurations(results):
    """metrics/benchmark.json: reference, fast paths and their ratio, copied exactly from the
    full results; no text but configuration names (dvc metrics/exp show list every leaf)."""
    out = Path(results["_out"])
    metrics = json.loads((out / "benchmark.json").read_text())
    details = json.loads((out / "details.json").read_text())
    configs = details["configs"]
    reference = configs[details["protocol"]["agreement_reference"]]
    assert reference["name"] == "fp32-nchw-eager-b1"
    fast = configs[details["fast_path"]["name"]]
    eager = configs[details["fast_path_eager"]["name"]]
    for key, entry in (("reference", reference), ("fast_path", fast), ("fast_path_eager", eager)):
        assert metrics[key] == {"config": entry["name"], **{
            k: entry[k] for k in ("latency_ms_median", "latency_ms_p90", "throughput_ips",
                                  "throughput_ips_load_corrected", "peak_memory_mb",
                                  "utilisation", "ceiling_tflops", "agreement")}}, key
        assert 0 < entry["utilisation"] <= 1
    assert metrics["fast_path_speedup"] == (fast["throughput_ips_load_corrected"]
                                            / reference["throughput_ips_load_corrected"])
    assert metrics["fast_path_speedup"] >= 1  # the reference itself is eligible
    assert metrics["gflops_per_image"] == details["model"]["flops_counted"] / 1e9
    ok = [e for e in configs.values() if e["status"] == "ok"]
    assert metrics["configs_measured"] == len(ok)
    assert metrics["configs_skipped"] == len(configs) - len(ok) > 0  # tf32 on CPU

    def leaves(value, path=()):
        if isinstance(value, dict):
            for k, v in value.items():
                yield from leaves(v, (*path, k))
        else:
            yield path, value
    texts = [p for p, v in leaves(metrics) if isinstance(v, str)]
    assert texts == [(k, "config") for k in ("reference", "fast_path", "fast_path_eager",
                                             "slide", "onnxruntime", "onnxruntime_int8")]
    slide, ort = configs[metrics["slide"]["config"]], configs[metrics["onnxruntime"]["config"]]
    assert slide["mode"] == "slide" and ort["runtime"] == "onnxruntime"
    assert ort["precision"] == "fp32"
    int8 = configs[metrics["onnxruntime_int8"]["config"]]
    assert int8["runtime"] == "onnxruntime" and int8["precision"] == "int8"
    assert metrics["int8_speedup"] == ort["latency_ms_median"] / int8["latency_ms_median"]
    whole = configs[slide["name"].replace("-slide", "")]
    assert metrics["slide_over_whole_memory"] == slide["peak_memory_mb"] / whole["peak_memory_mb"]


def test_slide_and_onnxruntime_are_measured_but_never_the_fast_path(results):
    configs = results["configs"]
    slide, ort = configs["fp32-cl-eager-slide-b1"], configs["onnxruntime-fp32-b1"]
    int8 = configs["onnxruntime-int8-b1"]
    assert slide["status"] == ort["status"] == int8["status"] == "ok"
    # the same weights: onnxruntime predicts what PyTorch does; slide mode sees less context;
    # int8 (calibrated on other scenes) mostly does
    assert ort["agreement"] >= 0.999 and 0.8 < int8["agreement"] < 1
    # slide mode does the work of every window: FLOPs per image count them all; int8 the
    # model's (its multiply-adds are the same, in 8 bits)
    assert slide["flops_per_image"] > configs["fp32-cl-eager-b1"]["flops_per_image"]
    assert int8["flops_per_image"] == ort["flops_per_image"] == results["model"]["flops_counted"]
    assert results["fast_path"]["name"] not in (slide["name"], ort["name"], int8["name"])


def test_int8_is_measured_on_cpus_only_with_a_reason():
    assert precision_support(torch.device("cpu"), "int8") is None
    reason = precision_support(torch.device("cuda"), "int8")
    assert reason.startswith("int8 is the deploy stage's model for CPUs")
    assert Config("int8", False, False, 1, runtime="onnxruntime").name == "onnxruntime-int8-b1"
    assert Config("int8", False, False, 1, runtime="onnxruntime").host_precision == "fp32"
    assert [c.name for c in plan(dataclasses.replace(TINY, int8=False))[1]
            if c.precision == "int8"] == []


def test_fp32_runs_and_tf32_is_skipped_on_cpu(results):
    configs = results["configs"]
    assert configs["fp32-nchw-eager-b1"]["status"] == "ok"
    assert configs["fp32-cl-eager-b1"]["status"] == "ok"
    assert configs["fp32-nchw-eager-b1"]["agreement"] == 1.0  # the reference itself
    for layout in ("nchw", "cl"):
        entry = configs[f"tf32-{layout}-eager-b1"]
        assert entry["status"] == "skipped" and "CUDA" in entry["reason"]


def test_fast_path_predictions_agree_with_fp32(results):
    fast = fastest_config(results)
    assert fast is not None and fast["agreement"] >= MIN_AGREEMENT
    assert results["fast_path"]["name"] == fast["name"]
    # Check the claim independently, in this process: same weights, same image.
    image = benchmark_images(1, TINY.height, TINY.width, TINY.seed)
    model = trained_like_model(ModelParams(), image[0], TINY.seed)
    cpu = torch.device("cpu")
    reference = predict_classes(model, image, cpu, "fp32", False)
    predicted = predict_classes(model, image, cpu, fast["precision"], fast["channels_last"])
    assert (predicted == reference).float().mean().item() >= MIN_AGREEMENT


def test_trained_like_model_predicts_varied_classes():
    image = benchmark_images(1, 64, 128, 0)
    model = trained_like_model(ModelParams(), image[0], 0)
    with torch.inference_mode():
        prediction = model(to_input(image, torch.device("cpu"), False)).argmax(1)
    assert prediction.unique().numel() >= 5  # else agreement would be trivially 100%


def test_failing_configuration_is_skipped_with_the_error(monkeypatch):
    def broken(job, start_method):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def unquantisable(fp32_onnx, out, seed, height, width):
        raise RuntimeError("calibration ran out of memory\nsecond line")

    import fcn.deploy

    monkeypatch.setattr(bench, "run_isolated", broken)
    monkeypatch.setattr(bench, "quantize_for_benchmark", unquantisable)
    monkeypatch.setattr(fcn.deploy, "export_onnx", lambda model, path, opset: None)
    params = dataclasses.replace(TINY, precisions=["fp32"], channels_last=[True])
    results = run_benchmark(params, ModelParams(), progress=False)
    entry = results["configs"]["fp32-cl-eager-b1"]
    assert entry["status"] == "skipped" and "out of memory" in entry["reason"]
    assert results["fast_path"] is None
    int8 = results["configs"]["onnxruntime-int8-b1"]  # its quantisation failed: it alone
    assert int8["status"] == "skipped" and int8["reason"] == (
        "failed: quantisation: RuntimeError: calibration ran out of memory")


def _entry(name: str, ips: float, agreement: float | None, status: str = "ok",
           compile: bool = False) -> dict:
    return {"name": name, "status": status, "throughput_ips": ips, "agreement": agreement,
            "compile": compile}


def test_fastest_config_needs_agreement_and_can_exclude_compile():
    results = {"configs": {e["name"]: e for e in (
        _entry("fp32", 1.0, 1.0), _entry("bf16", 3.0, 0.998),  # faster but changes predictions
        _entry("fp16", 2.0, 0.9995), _entry("fp16-compiled", 2.5, 0.9995, compile=True),
        _entry("tf32", 9.0, None, status="skipped"))}}
    assert fastest_config(results)["name"] == "fp16-compiled"
    assert fastest_config(results, allow_compile=False)["name"] == "fp16"
    assert fastest_config(results, min_agreement=0.99)["name"] == "bf16"
    assert fastest_config({"configs": {"x": _entry("x", 1.0, 0.5)}}) is None


def test_fast_path_ranking_corrects_for_machine_load():
    # Measured while other jobs ran: "cl" got half the matmul rate that "nchw" got.
    entries = {name: ConfigResult(name, "fp32", False, False, 1, status="ok", agreement=1.0,
                                  throughput_ips=ips, matmul_tflops=rate)
               for name, ips, rate in (("nchw", 0.10, 0.11), ("cl", 0.07, 0.06))}
    bench._correct_for_load(entries)
    assert entries["nchw"].throughput_ips_load_corrected == pytest.approx(0.10)
    assert entries["cl"].throughput_ips_load_corrected == pytest.approx(0.07 * 0.11 / 0.06)
    configs = {name: dataclasses.asdict(entry) for name, entry in entries.items()}
    assert fastest_config({"configs": configs})["name"] == "cl"


def _rates(*rows: tuple[str, str, float, float]) -> dict[str, ConfigResult]:
    return {name: ConfigResult(name, precision, False, False, 1, status="ok",
                               achieved_tflops=achieved, matmul_tflops=matmul)
            for name, precision, achieved, matmul in rows}


def test_utilisation_is_a_fraction_of_a_ceiling_no_configuration_exceeds():
    """Issue 21: the committed CPU run reported 111% and 128% 'of the matmul rate' (oneDNN's
    convolutions outrun its sgemm). Now the ceiling is the datasheet peak or, above it or
    without one, the best rate measured at that precision: never exceeded."""
    cpu = _rates(("cl", "fp32", 0.19, 0.17), ("slide", "fp32", 0.22, 0.17),
                 ("nchw", "fp32", 0.13, 0.18), ("bf16", "bf16", 0.05, 0.40))
    bench.set_utilisation(cpu, None)
    assert cpu["slide"].utilisation == 1.0 and cpu["cl"].utilisation == pytest.approx(0.19 / 0.22)
    assert cpu["nchw"].ceiling_tflops == 0.22 and "no datasheet peak" in cpu["nchw"].ceiling
    assert cpu["bf16"].utilisation == pytest.approx(0.05 / 0.40)  # its own precision's matmul
    gpu = _rates(("bf16", "bf16", 600.0, 700.0), ("fp32", "fp32", 80.0, 50.0))
    bench.set_utilisation(gpu, "NVIDIA H100 80GB HBM3")
    assert gpu["bf16"].ceiling_tflops == 989.4 and gpu["bf16"].ceiling.startswith("datasheet")
    assert gpu["fp32"].ceiling_tflops == 80.0 and "above the datasheet" in gpu["fp32"].ceiling
    assert all(e.utilisation <= 1 for e in [*cpu.values(), *gpu.values()])


def test_datasheet_peaks_are_found_by_model_and_never_guessed():
    from fcn.benchmark.capability import datasheet_peak

    assert datasheet_peak("NVIDIA H100 PCIe", "bf16") == 756.0
    assert datasheet_peak("NVIDIA H100 80GB HBM3", "tf32") == 494.7
    assert datasheet_peak("NVIDIA H200", "fp16") == 989.4
    assert datasheet_peak("NVIDIA H100 NVL", "bf16") is None
    assert datasheet_peak("NVIDIA L4", "bf16") is None and datasheet_peak(None, "fp32") is None


def test_config_names_are_unique_and_readable():
    assert Config("bf16", True, True, 4).name == "bf16-cl-compiled-b4"
    configs = plan(BenchmarkParams(device="cpu", profile="full"))[1]
    assert len({c.name for c in configs}) == len(configs)


@pytest.mark.slow
def test_compiled_configuration_reports_compile_time():
    params = dataclasses.replace(TINY, precisions=["fp32"], channels_last=[True],
                                 quick_compile=[True])
    results = run_benchmark(params, ModelParams(), progress=False)
    entry = results["configs"]["fp32-cl-compiled-b1"]
    assert entry["status"] == "ok", entry["reason"]
    assert entry["compile_s"] is not None and entry["compile_s"] >= 0
    assert entry["agreement"] >= MIN_AGREEMENT


@pytest.mark.slow
def test_stage_writes_metrics_and_plots(tmp_path):
    """The stage's function (the script only parses its arguments: tests/test_stage.py and the
    tiny pipeline run it) with a plan without NCHW."""
    params = dataclasses.replace(load_params(ROOT / "params.yaml").benchmark, device="cpu",
                                 height=64, width=128, precisions=["fp32", "fp16"],
                                 channels_last=[True], matmul_size=256)
    benchmark_stage(params, ModelParams(), tmp_path / "b.json", tmp_path / "d.json",
                    tmp_path / "plots")
    details = json.loads((tmp_path / "d.json").read_text())
    assert details["configs"]["fp32-cl-eager-b1"]["status"] == "ok"
    assert details["fast_path"]["name"] == "fp32-cl-eager-b1"
    metrics = json.loads((tmp_path / "b.json").read_text())
    assert metrics["fast_path"]["config"] == "fp32-cl-eager-b1"
    # no NCHW in the plan: the reference is fp32 channels-last, which is also the fast path
    assert metrics["reference"]["config"] == details["protocol"]["agreement_reference"]
    assert metrics["reference"] == metrics["fast_path"] and metrics["fast_path_speedup"] == 1.0
    assert (tmp_path / "plots" / "benchmark.png").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_reports_allocator_peaks_and_tf32_flags():
    params = dataclasses.replace(TINY, device="cuda", precisions=["fp32", "tf32", "bf16", "fp16"])
    results = run_benchmark(params, ModelParams(), progress=False)
    assert results["environment"]["device_name"] == torch.cuda.get_device_name()
    for entry in results["configs"].values():
        if entry["status"] != "ok":
            assert entry["reason"]
            continue
        assert entry["peak_allocated_mb"] > 0 and entry["peak_reserved_mb"] >= entry[
            "peak_allocated_mb"]
        assert entry["peak_rss_growth_mb"] is None
        assert entry["tf32_matmul"] == (entry["precision"] == "tf32")
    assert results["configs"]["fp32-nchw-eager-b1"]["status"] == "ok"


def test_workers_fork_from_a_server_or_spawn_when_it_cannot_start(monkeypatch, caplog):
    """The forkserver by default; where its Unix socket cannot be bound (a TMPDIR path over
    107 bytes), spawn, with a warning saying why."""
    from multiprocessing import forkserver

    from fcn.benchmark import worker

    assert worker.worker_context().get_start_method() == "forkserver"
    assert worker.worker_context("spawn").get_start_method() == "spawn"
    with pytest.raises(ValueError, match="start_method must be one of"):
        worker.worker_context("fork")

    def unbindable() -> None:
        raise OSError("AF_UNIX path too long")

    monkeypatch.setattr(forkserver, "ensure_running", unbindable)
    with caplog.at_level("WARNING", logger="fcn.benchmark.worker"):
        assert worker.worker_context().get_start_method() == "spawn"
    assert "no forkserver for the benchmark workers (AF_UNIX path too long" in caplog.text
