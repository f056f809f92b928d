"""Export: sources, presets, graphs, and parity with NeMo's own streaming loop (tiny model)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import onnx
import pytest

pytest.importorskip("nemo")
torch = pytest.importorskip("torch")

from export import models  # noqa: E402
from export.onnx_export import OPSET, export_preprocessor, export_step, read_metadata  # noqa: E402
from export.parity import run_preset  # noqa: E402
from sortformer_triton.presets import PRESETS, Preset, PresetError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(2)
    return models.load_model("tiny", seed=0)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_parity_with_nemo_batch_1_and_4(tiny, preset, tmp_path):
    """Every frame (through >= 3 compressions and the tail) equals NeMo's streaming loop, at batch 1 and in a
    batch of 4 streams of different lengths that start at different steps (the calibrated head: no ties;
    saturated heads with ties: tests/test_parity_ties.py)."""
    lines = run_preset(tiny, PRESETS[preset], [1, 4], None, 0, tmp_path, "tiny")
    for line in lines:
        print(json.dumps({k: v for k, v in line.items() if k != "decisions"}))
        assert line["case"] == "calibrated" and line["all_confirmed"], line
        # every frame within 1e-4, except after a decision NeMo itself made within float rounding
        # (reference.BOUNDARY_MARGIN) of its threshold: there the frames up to that decision must agree
        # (NeMo itself then moves too when its features are nudged by float rounding: either account may apply)
        for account, boundary in zip(line["accounts"], line["near_boundary"]):
            assert account is not None, line
            if account != "equal":
                assert boundary is not None and boundary["max_abs_diff_before"] <= 1e-4, line
        assert sum(t for ties in line["ties_per_compression"] for t in ties) == 0, line
        assert line["pass"], line
        assert line["features_max_abs_diff_vs_float64"] <= 1e-5, line
        assert line["features_max_abs_diff"] <= line["nemo_features_vs_float64"] + 1e-5, line
    assert min(lines[0]["compressions"]) >= 3
    assert lines[1]["batch"] == 4 and len(set(lines[1]["frames"])) == 4


def test_nemo_round_trip(tiny, tmp_path):
    """A .nemo saved with NeMo's save_to exports to the same graphs and keeps parity."""
    path = tmp_path / "tiny.nemo"
    tiny.save_to(str(path))
    loaded = models.load_model(str(path))
    for (name, a), (_, b) in zip(tiny.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    line = run_preset(loaded, PRESETS["low"], [1], 45.0, 0, tmp_path, str(path))[0]
    assert line["all_confirmed"] and line["max_abs_diff"] <= 1e-4 and line["compressions"][0] >= 2, line


def test_graph_metadata_and_opset(tiny, tmp_path):
    p = PRESETS["ultra_low"]
    pre = export_preprocessor(tiny, p, tmp_path / "pre.onnx", "tiny")
    step = export_step(tiny, p, tmp_path / "step.onnx", "tiny")
    for path, graph in ((pre, "preprocessor"), (step, "sortformer")):
        meta = read_metadata(path)
        assert meta["graph"] == graph and meta["preset"] == p.to_dict()
        opsets = {o.domain: o.version for o in onnx.load(str(path)).opset_import}
        assert opsets[""] == OPSET <= 20
    assert read_metadata(step)["emb_dim"] == 64


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(models.SourceError, match="not found"):
        models.load_model(str(tmp_path / "nope.nemo"))


def test_nemo_of_another_model_class_is_refused(tmp_path):
    path = tmp_path / "other.nemo"
    cfg = b"target: nemo.collections.asr.models.EncDecCTCModel\nsample_rate: 16000\n"
    with tarfile.open(path, "w:") as tar:
        info = tarfile.TarInfo("model_config.yaml")
        info.size = len(cfg)
        tar.addfile(info, io.BytesIO(cfg))
    with pytest.raises(models.SourceError, match="not a Sortformer"):
        models.load_model(str(path))


def test_not_an_archive_is_refused(tmp_path):
    path = tmp_path / "junk.nemo"
    path.write_bytes(b"this is not a tar archive")
    with pytest.raises(models.SourceError, match="not a readable .nemo"):
        models.load_model(str(path))


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.SourceError, match="Hugging Face"):
        models.load_model("nvidia/diar_streaming_sortformer_4spk-v2.1")


def test_per_utterance_normalization_is_refused(tiny):
    tiny.cfg.preprocessor.normalize = "per_feature"
    try:
        with pytest.raises(models.SourceError, match="cannot be computed while streaming"):
            models.check_causal_features(tiny)
    finally:
        tiny.cfg.preprocessor.normalize = "NA"


@pytest.mark.parametrize("kwargs, message", [
    (dict(chunk_len=0), "chunk_len must be at least 1"),
    (dict(spkcache_len=15), "speaker cache must hold"),
    (dict(spkcache_update_period=0), "spkcache_update_period"),
    (dict(right_context=-1), "right_context"),
])
def test_invalid_presets_are_refused(kwargs, message):
    values = dict(chunk_len=6, right_context=7, left_context=1, fifo_len=188, spkcache_update_period=144,
                  spkcache_len=188)
    values.update(kwargs)
    with pytest.raises(PresetError, match=message):
        Preset("custom", **values)


def test_cli_help_and_bad_custom_preset():
    help_text = subprocess.run([sys.executable, "-m", "export", "--help"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout
    for option in ("--model", "--out", "--flavour", "--preset", "--seed", "--max-batch-size",
                   "--max-candidate-sequences", "--instance-kind", "--custom-name", "--chunk-len",
                   "--right-context", "--spkcache-len"):
        assert option in help_text
    bad = subprocess.run([sys.executable, "-m", "export", "--model", "tiny", "--out", "/tmp/never",
                          "--custom-name", "bad", "--chunk-len", "0", "--right-context", "1"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "chunk_len must be at least 1" in bad.stderr


def test_tiny_model_refuses_the_checked_in_repository(tiny):
    from export.__main__ import export_repository
    from sortformer_triton import repository

    with pytest.raises(models.SourceError, match="full-size"):
        export_repository(tiny, "tiny", repository.REPOSITORY_ROOT, [PRESETS["low"]], ["local"])
