"""The production validator: the onnxruntime backend's load-time rules (NGC 24.10) on generated repositories.

The exported tiny production repository must pass, and the validator must refuse each counter-example
with the rule and Triton's words: the graphs as exported before static output shapes (the wave-1
artifact NGC refused), a symbolic output dim, a wrong state dtype, IR 13, a missing initial_state,
crosswise state names, and more. Export must refuse to write a repository that fails it.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Callable, List

import onnx
import onnxruntime as ort
import pytest

from sortformer_triton import contract, offline, repository, validator
from sortformer_triton.presets import PRESETS

LOW = PRESETS["low"]
SORTFORMER = contract.sortformer_name(LOW)
PREPROCESSOR = contract.preprocessor_name(LOW)


@pytest.fixture(scope="module")
def production(tiny_repository: Path) -> Path:
    return tiny_repository / "production"


@pytest.fixture(scope="module")
def tiny():
    """The exported weights again (same seed), to export broken graphs from."""
    from export.models import load_model

    return load_model("tiny", seed=0)


@pytest.fixture()
def copy(production: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny production repository to break."""
    return Path(shutil.copytree(production, tmp_path / "production"))


def _graph_path(root: Path, model: str) -> Path:
    return root / model / "1" / repository.ONNX_FILE


def _edit_graph(root: Path, model: str, edit: Callable[[onnx.ModelProto], None]) -> None:
    path = _graph_path(root, model)
    proto = onnx.load(str(path))
    edit(proto)
    path.unlink()  # the tiny repository's flavours share hard-linked files: never write through them
    onnx.save(proto, str(path))


def _edit_config(root: Path, model: str, edit: Callable[[object], None]) -> None:
    path = root / model / repository.CONFIG_FILE
    config = repository.parse(path.read_text())
    edit(config)
    path.write_text(repository.render(config))


def _rules(root: Path) -> List[validator.Violation]:
    return validator.validate_repository(root)


def _only(violations: List[validator.Violation], model: str, rule: str) -> List[str]:
    assert violations, "the validator found nothing"
    assert {(v.model, v.rule) for v in violations} == {(model, rule)}, "\n".join(map(str, violations))
    return [v.message for v in violations]


def _value(values, name: str):
    return next(v for v in values if v.name == name)


# ---- the real export passes ---------------------------------------------------------------------------
def test_the_exported_production_repository_passes(production: Path) -> None:
    assert validator.validate_repository(production) == []
    assert validator.main([str(production)]) == 0


def test_every_exported_output_is_static_but_the_batch_dim(production: Path) -> None:
    """What onnxruntime reports for every output of every graph: dynamic batch, then the contract's dims."""
    for p in PRESETS.values():
        for model, io in ((contract.preprocessor_name(p), contract.preprocessor_io(p)),
                          (contract.sortformer_name(p), contract.sortformer_io(p, 64))):
            session = ort.InferenceSession(str(_graph_path(production, model)), providers=["CPUExecutionProvider"])
            want = {t.name: t.dims for t in io.outputs} | {contract.STATE_OUT_PREFIX + s.name: s.dims for s in io.states}
            got = {o.name: o.shape for o in session.get_outputs()}
            assert set(got) == set(want), model
            for name, dims in want.items():
                assert isinstance(got[name][0], str), f"{model} {name}: batch dim {got[name][0]}"
                # a variable contract dim (SAVED_PROFILE) is symbolic, every other one static
                shape = [-1 if isinstance(d, str) else d for d in got[name][1:]]
                assert shape == list(dims), f"{model} {name}: {got[name]} vs [batch, *{list(dims)}]"
            proto = onnx.load(str(_graph_path(production, model)), load_external_data=False)
            assert proto.ir_version <= validator.MAX_IR_VERSION
            assert {o.domain: o.version for o in proto.opset_import} == {"": 17}


@pytest.fixture(scope="module")
def ngc_python() -> Path:
    """An interpreter with NGC 24.10's onnxruntime (1.19.2), in a venv of its own (scripts/setup.sh makes it)."""
    from loadtest.ort_versions import interpreter_for

    return interpreter_for(validator.ORT_VERSION)


# ---- counter-examples ---------------------------------------------------------------------------------
def test_graphs_exported_before_static_output_shapes_are_refused(copy: Path, tiny, monkeypatch) -> None:
    """The wave-1 artifact: torch leaves the speaker dim of CONFIRMED/TENTATIVE symbolic; NGC refused it."""
    from export import onnx_export

    monkeypatch.setattr(onnx_export, "declare_contract_shapes", lambda model, io: model)
    path = _graph_path(copy, SORTFORMER)
    path.unlink()
    onnx_export.export_step(tiny, LOW, path, "tiny")
    messages = _only(_rules(copy), SORTFORMER, "output")
    assert len(messages) == 2
    assert any("tensor 'CONFIRMED': the model expects 3 dimensions (shape [-1,6,-1]) but the model configuration "
               "specifies 3 dimensions" in m and "making complete shape [-1,6,4]" in m for m in messages), messages
    assert any("tensor 'TENTATIVE'" in m and "[-1,7,-1]" in m for m in messages), messages


def test_a_symbolic_output_dim_is_refused_even_where_inputs_would_pass(copy: Path) -> None:
    """The speaker dim of CONFIRMED declared symbolic (onnxruntime cannot infer it; other outputs' dims it can,
    and then reports them static, as the backend sees them), and a symbolic dim on the FEATURES input, which
    the backend compares loosely: only the output is refused."""
    def symbolic(proto: onnx.ModelProto) -> None:
        for values, name, axis in ((proto.graph.output, contract.CONFIRMED, 2), (proto.graph.input, contract.FEATURES, 1)):
            dim = _value(values, name).type.tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_param = "symbolic"

    _edit_graph(copy, SORTFORMER, symbolic)
    [message] = _only(_rules(copy), SORTFORMER, "output")
    assert "tensor 'CONFIRMED'" in message and "[-1,6,-1]" in message and "compared exactly" in message


def test_a_state_with_the_wrong_dtype_is_refused(copy: Path) -> None:
    def int32_lengths(config) -> None:
        state = next(s for s in config.sequence_batching.state if s.input_name == "spkcache_lengths")
        state.data_type = state.initial_state[0].data_type = repository.mc.TYPE_INT32

    _edit_config(copy, SORTFORMER, int32_lengths)
    messages = _only(_rules(copy), SORTFORMER, "state")
    assert any("expects datatype TYPE_INT32 for output state 'out_spkcache_lengths', model provides TYPE_INT64" in m
               for m in messages), messages
    assert any("state 'spkcache_lengths', model provides TYPE_INT64" in m for m in messages), messages


def test_ir_13_is_refused_as_onnxruntime_1_19_refuses_it(copy: Path, ngc_python: Path) -> None:
    def ir13(proto: onnx.ModelProto) -> None:
        proto.ir_version = 13

    _edit_graph(copy, SORTFORMER, ir13)
    [message] = _only(_rules(copy), SORTFORMER, "ir-version")
    assert "Unsupported model IR version: 13, max supported IR version: 10" in message
    load = (f"import onnxruntime as ort; ort.InferenceSession({str(_graph_path(copy, SORTFORMER))!r}, "
            "providers=['CPUExecutionProvider'])")
    proc = subprocess.run([str(ngc_python), "-c", load], capture_output=True, text=True)  # what production does
    assert proc.returncode != 0 and "Unsupported model IR version: 13, max supported IR version: 10" in proc.stderr


def test_an_opset_beyond_onnxruntime_1_19_is_refused(copy: Path) -> None:
    def opset27(proto: onnx.ModelProto) -> None:
        proto.opset_import[0].version = 27

    _edit_graph(copy, SORTFORMER, opset27)
    [message] = _only(_rules(copy), SORTFORMER, "opset")
    assert "opset 27" in message and "up to opset 21" in message


def test_a_missing_initial_state_is_refused(copy: Path) -> None:
    def no_initial(config) -> None:
        del config.sequence_batching.state[0].initial_state[:]

    _edit_config(copy, SORTFORMER, no_initial)
    [message] = _only(_rules(copy), SORTFORMER, "initial-state")
    assert "'spkcache' has 0 initial_state" in message and "first request" in message


def test_state_names_that_triton_pairs_crosswise_are_refused(copy: Path) -> None:
    """Suffix-named outputs (spkcache_out, spkcache_lengths_out, ...) in graph and config alike: every name
    exists with its dtype, yet Triton's name-sorted pairing crosses them (server #8586)."""
    renames = {contract.STATE_OUT_PREFIX + s.name: s.name + "_out" for s in contract.sortformer_io(LOW, 64).states}

    def graph(proto: onnx.ModelProto) -> None:
        for value in proto.graph.output:
            value.name = renames.get(value.name, value.name)
        for node in proto.graph.node:  # the new state is also read inside the graph (SAVED_PROFILE)
            node.output[:] = [renames.get(o, o) for o in node.output]
            node.input[:] = [renames.get(i, i) for i in node.input]

    def config(cfg) -> None:
        for s in cfg.sequence_batching.state:
            s.output_name = renames[s.output_name]

    _edit_graph(copy, SORTFORMER, graph)
    _edit_config(copy, SORTFORMER, config)
    messages = _only(_rules(copy), SORTFORMER, "state-pairing")
    assert any("Triton pairs state input 'spkcache_lengths' with output 'spkcache_out'" in m for m in messages), messages


def test_config_io_the_graph_does_not_have_is_refused(copy: Path) -> None:
    def extra(config) -> None:
        config.output.add(name="SPEAKER_EMBEDDINGS", data_type=repository.mc.TYPE_FP32, dims=[4])
        config.input.add(name="REFERENCE_AUDIO", data_type=repository.mc.TYPE_FP32, dims=[4])

    _edit_config(copy, SORTFORMER, extra)
    violations = _rules(copy)
    assert {(v.model, v.rule) for v in violations} == {(SORTFORMER, "output"), (SORTFORMER, "input"),
                                                       (SORTFORMER, "input-count")}, violations
    text = "\n".join(map(str, violations))
    assert "unexpected inference output 'SPEAKER_EMBEDDINGS'" in text and \
        "unexpected inference input 'REFERENCE_AUDIO'" in text
    assert "configuration expects 15 inputs, model provides 14" in text


def test_a_control_input_the_graph_lacks_and_a_static_batch_dim_are_refused(copy: Path) -> None:
    def static_batch(proto: onnx.ModelProto) -> None:
        dim = _value(proto.graph.input, contract.AUDIO_LENGTH).type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = 1

    def ready_control(config) -> None:
        control = config.sequence_batching.control_input.add(name="READY")
        control.control.add(kind=repository.mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_READY,
                            int32_false_true=[0, 1])

    _edit_graph(copy, PREPROCESSOR, static_batch)
    _edit_config(copy, PREPROCESSOR, ready_control)
    text = "\n".join(map(str, _rules(copy)))
    assert "[batch-dim]" in text and "does not support batching while non-zero max_batch_size" in text
    assert "sequence control 'READY', but model does not provide that input" in text


def test_a_missing_graph_file_is_refused(copy: Path) -> None:
    _graph_path(copy, SORTFORMER).unlink()
    [message] = _only(_rules(copy), SORTFORMER, "model-file")
    assert "unable to find" in message


# ---- export refuses to publish a repository that fails -------------------------------------------------
def test_export_refuses_to_write_a_failing_production_repository(tiny, tmp_path: Path, monkeypatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from export import onnx_export
    from export.__main__ import export_repository

    monkeypatch.setattr(onnx_export, "declare_contract_shapes", lambda model, io: model)
    out = tmp_path / "repo"
    with pytest.raises(validator.ProductionRepositoryError) as failure:
        export_repository(tiny, "tiny", out, [LOW], ["production", "local"])
    text = str(failure.value)
    assert str(out / "production") in text and "tensor 'CONFIRMED'" in text and "[output]" in text
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written, staging removed

    (out / "production").mkdir()
    (out / "production" / "marker").write_text("an earlier export")
    with pytest.raises(validator.ProductionRepositoryError):
        export_repository(tiny, "tiny", out, [LOW], ["production"])
    assert (out / "production" / "marker").read_text() == "an earlier export"  # left as it was


def test_export_cli_exits_2_with_the_violations(tmp_path: Path, monkeypatch, capsys) -> None:
    from export import __main__ as cli
    from export import onnx_export

    monkeypatch.setattr(onnx_export, "declare_contract_shapes", lambda model, io: model)
    code = cli.main(["--model", "tiny", "--preset", "ultra_low", "--flavour", "production",
                     "--out", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert "would refuse this repository" in err and "sortformer_ultra_low" in err and "CONFIRMED" in err
    assert not (tmp_path / "r" / "production").exists()


def test_export_once_passes_a_refused_export_on_and_writes_no_stamp(tmp_path: Path, monkeypatch) -> None:
    """docker/export_once.py (the compose export service) exits with the export's code, so the compose
    triton service (depends_on: service_completed_successfully) never starts on a refused repository."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_once", Path(__file__).parents[1] / "docker" / "export_once.py")
    once = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(once)
    monkeypatch.setattr(once.subprocess, "call", lambda cmd, **kw: 2)
    assert once.main(["--out", str(tmp_path)]) == 2
    assert not (tmp_path / once.STAMP).exists()


# ---- production graphs in onnxruntime 1.19.2 equal the reference on a multi-stream run ----------------
@pytest.mark.parametrize("preset", ["ultra_low", "very_high"])
def test_production_graphs_in_onnxruntime_1_19_2_equal_the_reference(production: Path, ngc_python: Path,
                                                                     tiny_reference_model, preset: str) -> None:
    """The production flavour's own files, in the onnxruntime NGC 24.10 ships, driven as Triton's implicit
    state would (4 streams of different ages per batch, flush steps, END), equal the in-process reference
    (the onnxruntime the local server runs) and NeMo's streaming loop."""
    from export.reference import nemo_stream
    from loadtest.ort_versions import run_worker, streams
    from sortformer_triton.inprocess import max_abs_diff, repository_graphs, stream_through

    seconds = 40.0
    ngc = run_worker(ngc_python, production, preset, seconds, count=4)
    assert ngc["onnxruntime"] == validator.ORT_VERSION and ngc["finished"]
    audios, start_at = streams(seconds, 4)
    local = stream_through(*repository_graphs(production, PRESETS[preset], 64), PRESETS[preset], audios, start_at)
    for audio, ours, theirs in zip(audios, local, ngc["preds"]):
        ref = nemo_stream(tiny_reference_model, PRESETS[preset], audio)
        assert ours.finished and theirs.shape == ours.preds.shape == ref.preds.shape
        assert max_abs_diff(ours.preds, theirs) <= 1e-5
        assert max_abs_diff(ref.preds, theirs) <= 1e-4


def test_a_custom_preset_exports_a_repository_that_passes(tiny, tmp_path: Path) -> None:
    """Static output dims come from the contract, so custom sizes get them too (validated by export itself)."""
    from export.__main__ import export_repository
    from sortformer_triton.presets import Preset

    custom = Preset("mine", chunk_len=12, right_context=3, left_context=2, fifo_len=60, spkcache_update_period=50,
                    spkcache_len=100)
    export_repository(tiny, "tiny", tmp_path, [custom], ["production"])
    assert validator.validate_repository(tmp_path / "production") == []
    session = ort.InferenceSession(str(_graph_path(tmp_path / "production", contract.sortformer_name(custom))),
                                   providers=["CPUExecutionProvider"])
    shapes = {o.name: o.shape for o in session.get_outputs()}
    assert shapes[contract.CONFIRMED] == ["batch", 12, 4] and shapes[contract.TENTATIVE] == ["batch", 3, 4]


_RUN_EVERY_GRAPH = r"""
import json, sys
import numpy as np, onnxruntime as ort
types = {"TYPE_FP32": np.float32, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64}
report = {}
for spec in json.loads(sys.argv[1]):
    session = ort.InferenceSession(spec["path"], providers=["CPUExecutionProvider"])
    feeds = {n: np.zeros([2, *d], types[t]) for n, (t, d) in spec["inputs"].items()}
    if "START" in {i.name for i in session.get_inputs()}:
        feeds["START"] = np.ones([2, 1], np.int32)
    names = [o.name for o in session.get_outputs()]
    report[spec["path"]] = {n: [list(v.shape), str(v.dtype)] for n, v in zip(names, session.run(names, feeds))}
print(json.dumps({"version": ort.__version__, "report": report}))
"""


def test_every_production_graph_loads_and_runs_in_onnxruntime_1_19_2(production: Path, ngc_python: Path) -> None:
    """Every onnxruntime model of every preset and the offline graph, in NGC 24.10's onnxruntime, fed zeros shaped
    by its config (batch 2, START=1), returns exactly the config's output and state shapes and dtypes."""
    import json

    np_names = {"TYPE_FP32": "float32", "TYPE_INT32": "int32", "TYPE_INT64": "int64"}
    specs, expected = [], {}
    for config_path in sorted(production.glob("*/config.pbtxt")):
        config = repository.parse(config_path.read_text())
        if config.backend != "onnxruntime":
            continue
        dtype = lambda t: repository.mc.DataType.Name(t.data_type)  # noqa: E731
        path = str(config_path.parent / "1" / config.default_model_filename)
        # a variable dim is fed 1 (PROFILE: no profile) and comes out 1 (SAVED_PROFILE: no row saves)
        fixed = lambda dims: [1 if d == -1 else d for d in dims]  # noqa: E731
        inputs = {t.name: (dtype(t), fixed(t.dims)) for t in config.input}
        inputs.update({s.input_name: (dtype(s), list(s.dims)) for s in config.sequence_batching.state})
        want = {t.name: [[2, *fixed(t.dims)], np_names[dtype(t)]] for t in config.output}
        if config.name == offline.SORTFORMER:  # one second of zeros: 100 mel frames -> 13 output frames
            inputs[contract.AUDIO] = ("TYPE_FP32", [16000])
            want[offline.PREDS][0] = [2, 13, 4]
        specs.append({"path": path, "inputs": inputs})
        want.update({s.output_name: [[2, *s.dims], np_names[dtype(s)]] for s in config.sequence_batching.state})
        expected[path] = want
    assert len(specs) == 2 * len(PRESETS) + 1  # + sortformer_offline
    proc = subprocess.run([str(ngc_python), "-c", _RUN_EVERY_GRAPH, json.dumps(specs)], capture_output=True,
                          text=True, check=True)
    result = json.loads(proc.stdout)
    assert result["version"] == validator.ORT_VERSION
    assert result["report"] == expected
