"""benchmarks/targets.py: issue 6's targets read from a GPU record (no GPU needed)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import targets  # noqa: E402

RECORD = REPO / "benchmarks" / "results" / "gpu-20261126-9c6a545c.json"


def test_report_of_a_committed_record():
    """The figures of record 9c6a545c as the README quotes them, each with its verdict."""
    text = targets.report(json.loads(RECORD.read_text()), RECORD.name)
    assert "missed  MnistCNN b64 pycnn-cudagraph                  215,709 samples/s (target 300,000; " \
           "PyTorch graph 146,935, eager 33,986)" in text
    assert "missed  FastMNIST pycnn-cudagraph-winograd     0.094 s (fastest of 5), mean acc 98.90% over 5 seed(s)" in text
    assert "model layers x directions no slower than cuDNN fp32 ('auto'): 9/30 in GPU time, 1/30 per call" in text
    assert "MET     compute-bound conv2d_fwd         exact fp32 (v3): 0.68x cuDNN fp32's throughput" in text
    assert "missed  compute-bound conv2d_fwd         v4 TF32: 0.22x cuDNN TF32's throughput" in text
    assert "v5 Winograd (fp32, opt-in): 1.89x cuDNN fp32" in text


def _entry(op, shape, version, gpu, dnn_gpu, ms, dnn, **extra):
    return {"op": op, "shape": shape, "version": version, "gpu_ms": gpu, "cudnn_gpu_ms": dnn_gpu, "ms": ms,
            "cudnn_ms": dnn, "layer": extra.pop("layer", "l"), **extra}


def test_met_and_missing_figures(tmp_path):
    big = targets.BIG
    record = {
        "commit": "abc", "device": "GPU", "date": "2026-11-27",
        "training": [
            {"model": "MnistCNN", "batch": 64, "variant": "pycnn-cudagraph", "samples_per_s": 310_000.0,
             "reference_samples_per_s": 150_000.0},
            {"model": "FastMNIST", "batch": 256, "variant": "pycnn-cudagraph", "wall_s": 0.091, "test_acc": 0.9905,
             "test_acc_runs": [0.99, 0.991], "reference_wall_s": 0.35, "reference_test_acc": 0.989},
        ],
        "kernels": [
            _entry("conv2d_fwd", [64, 32, 13, 13, 64, 3, 3, 1, 0], "v3", 0.010, 0.015, 0.030, 0.033, auto=True),
            _entry("conv2d_fwd", [64, 32, 13, 13, 64, 3, 3, 1, 0], "v3", 0.001, 0.015, 0.001, 0.033, auto=True,
                   wide=True),  # an A/B entry: not what "auto" runs
            _entry("conv2d_fwd", big, "v3", 1.0, 0.8, 1.0, 0.8, cudnn_tf32_gpu_ms=0.3),
            _entry("conv2d_fwd", big, "v4", 0.5, 0.8, 0.5, 0.8, cudnn_tf32_gpu_ms=0.3),
            _entry("conv2d_fwd", big, "v4", 0.4, 0.8, 0.4, 0.8, cudnn_tf32_gpu_ms=0.3, nhwc=True),  # listed apart
            _entry("conv2d_fwd", big, "v3", 1.6, 0.8, 1.6, 0.8, cudnn_tf32_gpu_ms=0.3, nhwc=True),  # (exact: fp32)
        ],
    }
    text = targets.report(record, "r.json")
    assert "MET     MnistCNN b64 pycnn-cudagraph" in text and "310,000 samples/s" in text
    assert "missed  MnistCNN b512 >= 1,000,000 samples/s: not in record" in text
    assert "MET     FastMNIST pycnn-cudagraph              0.091 s (fastest of 2), mean acc 99.05%" in text
    assert "MET     model layers x directions no slower than cuDNN fp32 ('auto'): 1/1 in GPU time, 1/1 per call" in text
    assert "MET     compute-bound conv2d_fwd         exact fp32 (v3): 0.80x" in text
    assert "MET     compute-bound conv2d_fwd         v4 TF32: 0.60x" in text
    assert "        compute-bound conv2d_fwd         v4 channels last (opt-in, PYCNN_CONV4_NHWC=1): 0.75x" in text
    assert "v3 channels last (exact fp32, opt-in, PYCNN_CONV3_NHWC=1): 0.50x cuDNN fp32" in text
    assert "faster than 'auto'" not in text  # (no v3 channels-last entry of a model layer)
    assert "missed  compute-bound conv2d_bwd_data    v4 TF32: not in record" in text
    path = tmp_path / "gpu-x.json"
    path.write_text(json.dumps(record))
    (tmp_path / "gpu-y.json").write_text(json.dumps({"date": "2099", "kernels": []}))  # no training: skipped
    assert targets.newest_record(tmp_path) == path
    with pytest.raises(FileNotFoundError, match="no GPU record with training and kernel figures"):
        targets.newest_record(tmp_path / "nowhere")


def test_what_the_col2im_backward_data_would_change_alone_and_with_channels_last():
    """"3c" entries (col2im: true) get their own what-if line, and with "3n" entries in the record
    too, a line for both taken wherever one of them is fastest."""
    shape = [64, 64, 5, 5, 64, 3, 3, 1, 0]
    record = {"kernels": [
        _entry("conv2d_bwd_data", shape, "v3", 0.030, 0.020, 0.05, 0.04, auto=True),
        _entry("conv2d_bwd_data", shape, "v3", 0.018, 0.020, 0.04, 0.04, col2im=True),  # faster, under cuDNN
        _entry("conv2d_bwd_data", shape, "v3", 0.025, 0.020, 0.05, 0.04, nhwc=True),  # faster, not enough
        _entry("conv2d_fwd", shape, "v3", 0.030, 0.020, 0.05, 0.04, auto=True),
        _entry("conv2d_fwd", shape, "v3", 0.015, 0.020, 0.03, 0.04, nhwc=True),
    ]}
    lines = targets.layer_lines(record)
    assert "0/2 in GPU time" in lines[0]
    assert lines[-3].endswith("v3 channels last (opt-in, PYCNN_CONV3_NHWC=1): faster than 'auto' on 2 of the 2 "
                              "layer directions it runs; taken where faster, 1/2 no slower than cuDNN in GPU time, "
                              "1/2 per call")
    assert lines[-2] == ("        v3 col2im backward-data (opt-in, PYCNN_CONV_BWD_DATA_COL2IM=1): faster than 'auto' "
                         "on 1 of the 1 layer directions it runs; taken where faster, 1/2 no slower than cuDNN in GPU "
                         "time, 1/2 per call")
    assert lines[-1] == ("        all of them, each taken where fastest: faster than 'auto' on 2 of 2; 2/2 no slower "
                         "than cuDNN in GPU time, 2/2 per call")
    assert targets.is_variant(record["kernels"][1])


def test_what_v3_channels_last_would_change():
    """The "3n" entries of model layers against what 'auto' runs: counted where faster, and the
    GPU-time count with them taken there; entries of other layers or versions do not count."""
    shape, other = [64, 32, 13, 13, 64, 3, 3, 1, 0], [64, 64, 5, 5, 64, 3, 3, 1, 0]
    record = {"kernels": [
        _entry("conv2d_fwd", shape, "v3", 0.030, 0.020, 0.05, 0.04, auto=True),  # slower than cuDNN ...
        _entry("conv2d_fwd", shape, "v3", 0.015, 0.020, 0.03, 0.04, nhwc=True),  # ... not with channels last
        _entry("conv2d_bwd_data", shape, "v3", 0.030, 0.020, 0.05, 0.04, auto=True),
        _entry("conv2d_bwd_data", shape, "v3", 0.040, 0.020, 0.05, 0.04, nhwc=True),  # slower: not taken
        _entry("conv2d_bwd_data", shape, "v4", 0.001, 0.020, 0.05, 0.04, nhwc=True),  # v4: not v3's
        _entry("conv2d_fwd", other, "v3", 0.010, 0.020, 0.05, 0.04, auto=True, layer="m"),  # no 3n entry
    ]}
    lines = targets.layer_lines(record)
    assert "1/3 in GPU time" in lines[0]
    assert lines[-1] == ("        v3 channels last (opt-in, PYCNN_CONV3_NHWC=1): faster than 'auto' on 1 of the 2 "
                         "layer directions it runs; taken where faster, 2/3 no slower than cuDNN in GPU time, "
                         "1/3 per call")
