"""The generated Triton configs: they parse, match the checked-in tree, and obey Triton's rules.

Why each check matters is in DESIGN.md "Known Triton pitfalls": name-sorted state pairing (#8586),
zero initial state, idle timeouts longer than a step, Python models keeping their own per-CORRID state.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from sortformer_triton import contract, repository
from sortformer_triton.presets import PRESETS, get_preset

ALL = list(PRESETS.values())
EMB = repository.FULL_EMB_DIM


@pytest.fixture(scope="module")
def configs() -> Dict[str, Dict[str, mc.ModelConfig]]:
    return {flavour: repository.model_configs(flavour, ALL, EMB) for flavour in repository.FLAVOURS}


def _all(configs: Dict[str, Dict[str, mc.ModelConfig]]) -> List[Tuple[str, mc.ModelConfig]]:
    return [(flavour, c) for flavour, by_name in configs.items() for c in by_name.values()]


def _stateful(configs: Dict[str, mc.ModelConfig]) -> List[mc.ModelConfig]:
    return [c for name, c in configs.items() if name.startswith(("preprocessor_", "sortformer_"))]


def _state_pairs(config: mc.ModelConfig) -> List[Tuple[str, str]]:
    return [(s.input_name, s.output_name) for s in config.sequence_batching.state]


# ---- parsing and the checked-in tree -------------------------------------------------------------
def test_every_model_is_generated(configs) -> None:
    expected = {contract.POSTPROCESSOR, contract.ADMISSION}
    for p in ALL:
        expected |= set(contract.preset_models(p))
    for flavour in repository.FLAVOURS:
        assert set(configs[flavour]) == expected
        assert all(name == c.name for name, c in configs[flavour].items())


def test_every_config_parses_with_model_config_pb2(configs) -> None:
    for _, config in _all(configs):
        text = repository.render(config)
        parsed = text_format.Parse(text, mc.ModelConfig())
        assert parsed == config
        assert text_format.MessageToString(parsed) in text


def test_checked_in_tree_equals_generator() -> None:
    for flavour in repository.FLAVOURS:
        root = repository.REPOSITORY_ROOT / flavour
        problems = repository.check_tree(root, flavour, ALL, EMB)
        assert problems == [], "\n".join(problems) + "\nrun: python -m sortformer_triton.repository --write"


def test_checked_in_configs_parse() -> None:
    paths = sorted(repository.REPOSITORY_ROOT.glob("*/*/config.pbtxt"))
    assert len(paths) == 2 * (4 * len(ALL) + 2)  # per preset 4, plus postprocessor and admission
    for path in paths:
        config = text_format.Parse(path.read_text(), mc.ModelConfig())
        assert config.name == path.parent.name
        assert (path.parent / repository.VERSION_DIR).is_dir()


def _untracked(directory: str, names: List[str]) -> List[str]:
    """copytree filter: keep dirs, config.pbtxt and .keep (exported ONNX files can be hundreds of MB)."""
    keep = {repository.CONFIG_FILE, repository.KEEP_FILE}
    return [n for n in names
            if n == "__pycache__" or ((Path(directory) / n).is_file() and n not in keep)]


def test_hand_edit_is_detected(tmp_path: Path) -> None:
    tree = tmp_path / "model_repository"
    shutil.copytree(repository.REPOSITORY_ROOT, tree, ignore=_untracked)
    assert repository.main(["--check", "--root", str(tree)]) == 0
    victim = tree / "production" / "sortformer_low" / "config.pbtxt"
    victim.write_text(victim.read_text().replace("max_batch_size: 8", "max_batch_size: 4"))
    problems = repository.check_tree(tree / "production", "production", ALL, EMB)
    assert len(problems) == 1 and "-max_batch_size: 4" in problems[0] and "+max_batch_size: 8" in problems[0]
    assert repository.main(["--check", "--root", str(tree)]) == 1
    assert repository.main(["--write", "--root", str(tree)]) == 0
    assert repository.main(["--check", "--root", str(tree)]) == 0


def test_stale_and_missing_models_are_detected(tmp_path: Path) -> None:
    root = tmp_path / "local"
    repository.write_configs(root, "local", ALL, EMB)
    shutil.copytree(root / "sortformer_low", root / "sortformer_renamed")
    shutil.rmtree(root / "diarizer_high")
    problems = repository.check_tree(root, "local", ALL, EMB)
    assert any("stale model dir" in p and "sortformer_renamed" in p for p in problems)
    assert any(p.startswith("missing") and "diarizer_high" in p for p in problems)


def test_write_configs_creates_version_dirs(tmp_path: Path) -> None:
    written = repository.write_configs(tmp_path, "production", [PRESETS["low"]], 16)
    assert sorted(p.parent.name for p in written) == [
        "admission", "diarizer_low", "diarizer_low_from_profile", "postprocessor", "preprocessor_low", "sortformer_low"]
    for path in written:
        assert (path.parent / "1").is_dir(), "ensembles need an (empty) version dir too"
        assert (path.parent / "1" / repository.KEEP_FILE).exists()


def test_keep_files_are_tracked_but_artifacts_ignored() -> None:
    root = repository.REPOSITORY_ROOT.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(rel: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", rel], cwd=root).returncode == 0

    assert not ignored("model_repository/production/sortformer_low/1/.keep")
    assert not ignored("model_repository/production/sortformer_low/config.pbtxt")
    assert ignored("model_repository/production/sortformer_low/1/model.onnx")
    assert ignored("model_repository/local/sortformer_low/1/model.py")


# ---- Triton's name-sorted state pairing (server issue #8586) ----------------------------------------
def test_pairing_rule_holds_for_every_production_config(configs) -> None:
    for config in _stateful(configs["production"]):
        pairs = _state_pairs(config)
        assert pairs, config.name
        ins = sorted(i for i, _ in pairs)
        outs = sorted(o for _, o in pairs)
        assert list(zip(ins, outs)) == sorted(pairs), config.name
        repository.check_state_pairing(config)


def _with_states(pairs: List[Tuple[str, str]]) -> mc.ModelConfig:
    config = mc.ModelConfig(name="crosswise")
    for i, o in pairs:
        config.sequence_batching.state.add(input_name=i, output_name=o, data_type=mc.TYPE_FP32, dims=[1])
    return config


def test_check_state_pairing_catches_suffix_naming() -> None:
    crosswise = _with_states([("spkcache", "spkcache_out"), ("spkcache_lengths", "spkcache_lengths_out")])
    with pytest.raises(ValueError, match="spkcache_lengths_out"):
        repository.check_state_pairing(crosswise)
    prefixed = _with_states([("spkcache", "out_spkcache"), ("spkcache_lengths", "out_spkcache_lengths")])
    repository.check_state_pairing(prefixed)


def test_validate_refuses_crosswise_states(configs) -> None:
    config = mc.ModelConfig()
    config.CopyFrom(configs["production"]["sortformer_low"])
    for s in config.sequence_batching.state:
        s.output_name = s.input_name + "_out"
        s.initial_state[0].name = "zeros"
    with pytest.raises(ValueError, match="pairing"):
        repository.validate(config)


# ---- production and local flavours -----------------------------------------------------------------
def _control(config: mc.ModelConfig, name: str) -> mc.ModelSequenceBatching.Control:
    matches = [c for c in config.sequence_batching.control_input if c.name == name]
    assert len(matches) == 1, f"{config.name}: control input {name}"
    assert len(matches[0].control) == 1
    return matches[0].control[0]


def test_production_has_implicit_state_and_onnxruntime(configs) -> None:
    for p in ALL:
        for name, io in ((contract.preprocessor_name(p), contract.preprocessor_io(p)),
                         (contract.sortformer_name(p), contract.sortformer_io(p, EMB))):
            config = configs["production"][name]
            assert config.backend == "onnxruntime"
            assert config.default_model_filename == "model.onnx"
            assert [(s.input_name, s.output_name) for s in config.sequence_batching.state] == io.state_pairs()
            for s, t in zip(config.sequence_batching.state, io.states):
                assert list(s.dims) == list(t.dims) and min(s.dims) >= 1
                assert mc.DataType.Name(s.data_type) == t.triton_dtype
                (init,) = s.initial_state
                assert init.zero_data and init.name == "zeros"
                assert init.data_type == s.data_type and list(init.dims) == list(s.dims)
            start = _control(config, contract.START)
            assert start.kind == mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START
            assert list(start.int32_false_true) == [0, 1]
            assert [c.name for c in config.sequence_batching.control_input] == [contract.START]
            assert config.sequence_batching.WhichOneof("strategy_choice") == "oldest"
            assert not config.parameters


def test_sortformer_state_uses_emb_dim(configs) -> None:
    tiny = repository.model_configs("production", [PRESETS["low"]], 32)["sortformer_low"]
    dims = {s.input_name: list(s.dims) for s in tiny.sequence_batching.state}
    assert dims["spkcache"] == [PRESETS["low"].spkcache_len, 32] and dims["mean_sil_emb"] == [32]
    full = {s.input_name: list(s.dims) for s in configs["production"]["sortformer_low"].sequence_batching.state}
    assert full["fifo"] == [PRESETS["low"].fifo_len, EMB]


def test_local_has_no_state_python_backend_and_corrid(configs) -> None:
    for p in ALL:
        for name, io in ((contract.preprocessor_name(p), contract.preprocessor_io(p)),
                         (contract.sortformer_name(p), contract.sortformer_io(p, EMB))):
            config = configs["local"][name]
            assert config.backend == "python"
            assert not config.sequence_batching.state
            assert not config.default_model_filename, "the Python backend loads model.py by default"
            corrid = _control(config, repository.CORRID)
            assert corrid.kind == mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_CORRID
            assert corrid.data_type == mc.TYPE_UINT64
            end = _control(config, repository.END)
            assert end.kind == mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_END
            assert list(end.int32_false_true) == [0, 1]
            params = {k: v.string_value for k, v in config.parameters.items()}
            assert params["onnx_file"] == "model.onnx"
            assert int(params["intra_op_threads"]) == repository.DEFAULT_INTRA_OP_THREADS
            idle_us = config.sequence_batching.max_sequence_idle_microseconds
            assert int(params["state_ttl_seconds"]) * 1_000_000 >= idle_us
            spec = json.loads(params["state_spec"])
            assert spec == [{"name": s.name, "output_name": contract.STATE_OUT_PREFIX + s.name,
                             "dtype": s.dtype, "dims": list(s.dims)} for s in io.states]


def _without_flavour_sections(config: mc.ModelConfig) -> mc.ModelConfig:
    stripped = mc.ModelConfig()
    stripped.CopyFrom(config)
    for field in ("backend", "default_model_filename", "parameters"):
        stripped.ClearField(field)
    stripped.sequence_batching.ClearField("state")
    stripped.sequence_batching.ClearField("control_input")
    return stripped


def test_flavours_differ_only_in_backend_and_state(configs) -> None:
    for name, production in configs["production"].items():
        local = configs["local"][name]
        if name.startswith(("preprocessor_", "sortformer_")):
            assert _without_flavour_sections(production) == _without_flavour_sections(local), name
        else:
            assert production == local, f"{name} must be identical in both flavours"


def test_instance_kind_gpu_is_available() -> None:
    gpu = repository.model_configs("production", [PRESETS["high"]], 16, instance_kind="KIND_GPU")
    assert gpu["sortformer_high"].instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert gpu["preprocessor_high"].instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert gpu["postprocessor"].instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert gpu["admission"].instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    cpu = repository.model_configs("production", [PRESETS["high"]], 16)
    assert cpu["sortformer_high"].instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert cpu["sortformer_high"].instance_group[0].count == 1
    with pytest.raises(ValueError, match="instance_kind"):
        repository.model_configs("production", [PRESETS["high"]], 16, instance_kind="KIND_TPU")


# ---- sequence batching sizes and timeouts ----------------------------------------------------------
def test_idle_timeout_outlasts_slow_steps(configs) -> None:
    very_high = PRESETS["very_high"]
    for flavour in repository.FLAVOURS:
        for name in (contract.preprocessor_name(very_high), contract.sortformer_name(very_high)):
            idle_s = configs[flavour][name].sequence_batching.max_sequence_idle_microseconds / 1e6
            assert idle_s > 4 * very_high.step_seconds, name
        for p in ALL:
            sequence_batching = configs[flavour][contract.sortformer_name(p)].sequence_batching
            idle_s = sequence_batching.max_sequence_idle_microseconds / 1e6
            assert idle_s >= 60 and idle_s > 4 * p.step_seconds


def test_batch_and_candidate_sizes(configs) -> None:
    for _, config in _all(configs):
        assert config.max_batch_size >= 8, config.name
        if config.HasField("sequence_batching"):
            oldest = config.sequence_batching.oldest
            assert oldest.max_candidate_sequences >= 16, config.name
            assert list(oldest.preferred_batch_size) == [2, 4, 8]
            assert 0 < oldest.max_queue_delay_microseconds <= 10_000
    post = configs["production"][contract.POSTPROCESSOR]  # no slots of its own: the stateful models' are the limit
    assert not post.HasField("sequence_batching") and post.dynamic_batching.max_queue_delay_microseconds > 0
    custom = repository.model_configs("production", ALL, 16, max_batch_size=4, max_candidate_sequences=32)
    assert custom["sortformer_low"].max_batch_size == 4
    assert list(custom["sortformer_low"].sequence_batching.oldest.preferred_batch_size) == [2, 4]
    assert custom["sortformer_low"].sequence_batching.oldest.max_candidate_sequences == 32
    with pytest.raises(ValueError, match="max_candidate_sequences"):
        repository.model_configs("production", ALL, 16, max_batch_size=8, max_candidate_sequences=4)


# ---- postprocessor ----------------------------------------------------------------------------------
def test_postprocessor(configs) -> None:
    post = configs["production"][contract.POSTPROCESSOR]
    assert post.backend == "python" and post.max_batch_size == 8
    io = contract.postprocessor_io()
    assert [t.name for t in post.input] == [t.name for t in io.inputs]
    assert [t.name for t in post.output] == [t.name for t in io.outputs]
    # no sequence batcher: START/END/CORRID come from the request (one batcher shared by every preset would
    # join the same id on two presets into one sequence, issue 12)
    assert not post.HasField("sequence_batching")
    params = {k: v.string_value for k, v in post.parameters.items()}
    ttl_keys = ("state_ttl_seconds", repository.PRESET_TTL_PARAMETER)
    assert {k: float(v) for k, v in params.items() if k not in ttl_keys} == {
        "onset": 0.5, "offset": 0.5, "pad_onset": 0.0, "pad_offset": 0.0,
        "min_duration_on": 0.25, "min_duration_off": 0.1, "median_filter_frames": 1.0}
    # each preset's streams expire with that preset's sequence slots (not the longest preset's)
    ttls = json.loads(params[repository.PRESET_TTL_PARAMETER])
    for p in ALL:
        idle = configs["production"][contract.sortformer_name(p)].sequence_batching.max_sequence_idle_microseconds
        assert ttls[repository.preset_key(p)] * 1_000_000 == idle, p.name
    assert int(params["state_ttl_seconds"]) == max(ttls.values())


def test_admission_checks_starts_with_the_postprocessors_defaults(configs) -> None:
    admission, post = configs["production"][contract.ADMISSION], configs["production"][contract.POSTPROCESSOR]
    assert admission.backend == "python" and not admission.HasField("sequence_batching")
    assert admission.dynamic_batching.max_queue_delay_microseconds == 0
    segment = {k: v.string_value for k, v in post.parameters.items() if k in repository.POSTPROCESSOR_DEFAULTS}
    assert {k: v.string_value for k, v in admission.parameters.items()} == segment
    custom = repository.model_configs("local", [PRESETS["low"]], 16, postprocessor_params={"onset": 0.7})
    assert custom[contract.ADMISSION].parameters["onset"].string_value == "0.7"


def test_postprocessor_overrides() -> None:
    custom = repository.model_configs("local", [PRESETS["low"]], 16,
                                      postprocessor_params={"onset": 0.7, "median_filter_frames": 11})
    params = custom[contract.POSTPROCESSOR].parameters
    assert params["onset"].string_value == "0.7" and params["median_filter_frames"].string_value == "11"
    for bad in ({"onsett": 0.5}, {"onset": 1.5}, {"min_duration_on": -1.0}, {"median_filter_frames": 4}):
        with pytest.raises(ValueError):
            repository.model_configs("local", [PRESETS["low"]], 16, postprocessor_params=bad)


# ---- ensembles ----------------------------------------------------------------------------------------
def test_ensemble_wiring(configs) -> None:
    for flavour, by_name in configs.items():
        for p, resume in [(p, resume) for p in ALL for resume in (False, True)]:
            ens = by_name[contract.resume_ensemble_name(p) if resume else contract.ensemble_name(p)]
            assert ens.platform == "ensemble" and not ens.HasField("sequence_batching")
            io = contract.ensemble_io(p, resume)
            assert [t.name for t in ens.input] == [t.name for t in io.inputs] == ["AUDIO", "AUDIO_LENGTH"] + (
                ["PROFILE", "PROFILE_HEADER"] if resume else [])
            assert [t.name for t in ens.output] == [
                "CONFIRMED", "N_CONFIRMED", "TENTATIVE", "N_TENTATIVE", "FRAME_OFFSET", "FINISHED",
                "SAVED_PROFILE", "SAVED_PROFILE_HEADER", "SEGMENTS", "N_SEGMENTS", "SPEAKER_NAMES"]
            steps = ens.ensemble_scheduling.step
            assert [s.model_name for s in steps] == [
                contract.ADMISSION, contract.preprocessor_name(p), contract.sortformer_name(p), contract.POSTPROCESSOR]
            # the preprocessor runs only on admitted requests; every output comes from the last step
            assert steps[1].input_map[contract.AUDIO_LENGTH] == contract.ADMITTED_AUDIO_LENGTH
            # the profile: from the client (a START from a saved profile) or none, from admission
            assert steps[2].input_map[contract.PROFILE] == ("PROFILE" if resume else contract.ADMITTED_PROFILE)
            assert set(steps[-1].output_map.values()) == {t.name for t in ens.output}
            produced = {t.name: (t.data_type, list(t.dims)) for t in ens.input}
            for step in steps:
                model = by_name[step.model_name]
                model_in = {t.name: (t.data_type, list(t.dims)) for t in model.input}
                model_out = {t.name: (t.data_type, list(t.dims)) for t in model.output}
                assert set(step.input_map) == set(model_in), step.model_name
                for key, value in step.input_map.items():
                    have, want = produced[value], model_in[key]
                    assert have[0] == want[0] and len(have[1]) == len(want[1])
                    assert all(a == b or b == -1 for a, b in zip(have[1], want[1])), (flavour, key)
                for key, value in step.output_map.items():
                    produced[value] = model_out[key]
            for t in ens.output:  # a -1 dim of the composing model is fixed by the ensemble (SEGMENTS rows)
                have = produced[t.name]
                assert have[0] == t.data_type and len(have[1]) == len(t.dims), (flavour, t.name)
                assert all(a == b or a == -1 for a, b in zip(have[1], t.dims)), (flavour, t.name)
            segments = next(t for t in ens.output if t.name == contract.SEGMENTS)
            assert list(segments.dims) == [contract.segment_rows(p.chunk_len), 4]


def test_presets_the_shared_postprocessor_cannot_tell_apart_are_refused() -> None:
    twin = dataclasses.replace(get_preset("low"), name="low_twin", fifo_len=100)
    with pytest.raises(ValueError, match="share chunk_len 6 and right context 7"):
        repository.model_configs("local", [get_preset("low"), twin], emb_dim=8)


def test_validate_catches_broken_ensembles(configs) -> None:
    by_name = configs["production"]
    broken = mc.ModelConfig()
    broken.CopyFrom(by_name["diarizer_low"])
    sortformer_step = [s for s in broken.ensemble_scheduling.step if s.model_name == "sortformer_low"][0]
    del sortformer_step.input_map["CHUNK_INDEX"]
    with pytest.raises(ValueError, match="CHUNK_INDEX"):
        repository.validate(broken, by_name)

    wrong_shape = dict(by_name)
    sortformer = mc.ModelConfig()
    sortformer.CopyFrom(by_name["sortformer_low"])
    sortformer.input[0].dims[0] += 8
    wrong_shape["sortformer_low"] = sortformer
    with pytest.raises(ValueError, match="FEATURES"):
        repository.validate(by_name["diarizer_low"], wrong_shape)

    with_seq = mc.ModelConfig()
    with_seq.CopyFrom(by_name["diarizer_low"])
    with_seq.sequence_batching.max_sequence_idle_microseconds = 1
    with pytest.raises(ValueError, match="sequence_batching"):
        repository.validate(with_seq, by_name)


def test_validate_catches_bad_states(configs) -> None:
    config = mc.ModelConfig()
    config.CopyFrom(configs["production"]["preprocessor_low"])
    config.sequence_batching.state[0].dims[0] = 0
    with pytest.raises(ValueError, match="dims"):
        repository.validate(config)
    config.CopyFrom(configs["production"]["preprocessor_low"])
    del config.sequence_batching.state[0].initial_state[:]
    with pytest.raises(ValueError, match="initial_state"):
        repository.validate(config)
    config.CopyFrom(configs["local"]["preprocessor_low"])
    config.parameters["state_ttl_seconds"].string_value = "1"
    with pytest.raises(ValueError, match="state_ttl_seconds"):
        repository.validate(config)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="flavour"):
        repository.model_configs("staging", ALL, EMB)
    with pytest.raises(ValueError, match="duplicate"):
        repository.model_configs("local", [PRESETS["low"], PRESETS["low"]], EMB)
    with pytest.raises(ValueError, match="emb_dim"):
        repository.model_configs("local", ALL, 0)
