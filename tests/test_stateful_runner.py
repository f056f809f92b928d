"""The local stand-in for implicit state: a stateful ONNX graph run per sequence, batched.

A toy accumulator graph (state ``acc`` [3] float32 and ``count`` [1] int64, control input START) is
checked against a numpy reference, first through ``StatefulOnnxRunner`` directly, then through the
real local tritonserver with ``python_backend/stateful_onnx/model.py`` and concurrent gRPC streams.
"""
from __future__ import annotations

import json
import random
import shutil
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import onnx
import pytest
from google.protobuf import json_format, text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from sortformer_triton import contract, repository
from sortformer_triton.stateful_runner import (
    ControlNames,
    RunnerConfig,
    SequenceRequest,
    StatefulModelError,
    StatefulOnnxRunner,
    parse_state_spec,
    plan_waves,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_PY = REPO_ROOT / "python_backend" / "stateful_onnx" / "model.py"
TOY_MODEL = "toy_stateful"
WIDTH = 3
TTL_S = 30.0
IDLE_US = 10_000_000
QUEUE_DELAY_US = 20_000  # long enough that concurrent streams meet in one batch on 2 cores

TOY_STATE_SPEC = [
    {"name": "acc", "out_name": "out_acc", "dtype": "float32", "dims": [WIDTH]},
    {"name": "count", "out_name": "out_count", "dtype": "int64", "dims": [1]},
]


# ---- the toy graph and its reference ------------------------------------------------------------
def toy_graph(start_dtype: int = TensorProto.INT32, acc_dims: Tuple[int, ...] = (WIDTH,)) -> onnx.ModelProto:
    """out_acc = where(START, 0, acc) + X; out_count = where(START, 0, count) + 1; Y, N copy them."""
    batch = "batch"
    inputs = [
        helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, WIDTH]),
        helper.make_tensor_value_info(contract.START, start_dtype, [batch, 1]),
        helper.make_tensor_value_info("acc", TensorProto.FLOAT, [batch, *acc_dims]),
        helper.make_tensor_value_info("count", TensorProto.INT64, [batch, 1]),
    ]
    outputs = [
        helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, WIDTH]),
        helper.make_tensor_value_info("N", TensorProto.INT64, [batch, 1]),
        helper.make_tensor_value_info("out_acc", TensorProto.FLOAT, [batch, *acc_dims]),
        helper.make_tensor_value_info("out_count", TensorProto.INT64, [batch, 1]),
    ]
    consts = [
        helper.make_tensor("zero_f", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("zero_i", TensorProto.INT64, [], [0]),
        helper.make_tensor("one_i", TensorProto.INT64, [], [1]),
    ]
    nodes = [
        helper.make_node("Cast", [contract.START], ["start_b"], to=TensorProto.BOOL),
        helper.make_node("Where", ["start_b", "zero_f", "acc"], ["acc0"]),
        helper.make_node("Add", ["acc0", "X"], ["out_acc"]),
        helper.make_node("Identity", ["out_acc"], ["Y"]),
        helper.make_node("Where", ["start_b", "zero_i", "count"], ["count0"]),
        helper.make_node("Add", ["count0", "one_i"], ["out_count"]),
        helper.make_node("Identity", ["out_count"], ["N"]),
    ]
    graph = helper.make_graph(nodes, "toy_stateful", inputs, outputs, initializer=consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def reference(steps: List[np.ndarray]) -> List[Tuple[np.ndarray, int]]:
    """(Y, N) after each step of one sequence, in numpy."""
    acc = np.zeros(WIDTH, dtype=np.float32)
    out = []
    for n, x in enumerate(steps, start=1):
        acc = (acc + x).astype(np.float32)
        out.append((acc.copy(), n))
    return out


def random_steps(rng: np.random.Generator, n: int) -> List[np.ndarray]:
    return [rng.standard_normal(WIDTH).astype(np.float32) for _ in range(n)]


# ---- model config (the local flavour) -----------------------------------------------------------
def toy_config(
    state_spec: Optional[list] = None,
    ttl_s: float = TTL_S,
    idle_us: int = IDLE_US,
    queue_delay_us: int = QUEUE_DELAY_US,
) -> mc.ModelConfig:
    """The toy model's config as the local flavour writes it: python backend, oldest batching,
    START/END/CORRID control inputs, onnx_file/state_spec/state_ttl_seconds parameters."""
    seq = mc.ModelSequenceBatching
    start = seq.ControlInput(name=contract.START, control=[seq.Control(
        kind=seq.Control.CONTROL_SEQUENCE_START, int32_false_true=[0, 1])])
    end = seq.ControlInput(name=repository.END, control=[seq.Control(
        kind=seq.Control.CONTROL_SEQUENCE_END, int32_false_true=[0, 1])])
    corrid = seq.ControlInput(name=repository.CORRID, control=[seq.Control(
        kind=seq.Control.CONTROL_SEQUENCE_CORRID, data_type=mc.TYPE_UINT64)])
    config = mc.ModelConfig(
        name=TOY_MODEL,
        backend="python",
        max_batch_size=8,
        input=[mc.ModelInput(name="X", data_type=mc.TYPE_FP32, dims=[WIDTH])],
        output=[
            mc.ModelOutput(name="Y", data_type=mc.TYPE_FP32, dims=[WIDTH]),
            mc.ModelOutput(name="N", data_type=mc.TYPE_INT64, dims=[1]),
        ],
        sequence_batching=seq(
            max_sequence_idle_microseconds=idle_us,
            control_input=[start, end, corrid],
            oldest=seq.StrategyOldest(
                max_candidate_sequences=16,
                preferred_batch_size=[2, 4, 8],
                max_queue_delay_microseconds=queue_delay_us,
            ),
        ),
        instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)],
    )
    params = {
        "onnx_file": "toy.onnx",
        "state_ttl_seconds": f"{ttl_s:g}",
        "intra_op_threads": "1",
        "state_spec": json.dumps(TOY_STATE_SPEC if state_spec is None else state_spec),
    }
    for key, value in params.items():
        config.parameters[key].string_value = value
    return config


def config_as_triton_json(config: mc.ModelConfig) -> dict:
    """The config as the Python backend receives it (``args["model_config"]``: proto field names)."""
    return json.loads(json_format.MessageToJson(config, preserving_proto_field_name=True))


def write_toy_model(root: Path, config: mc.ModelConfig, graph: Optional[onnx.ModelProto] = None) -> Path:
    """``<root>/<model>/config.pbtxt`` and ``1/{toy.onnx, model.py}``; returns the version dir."""
    version = root / config.name / "1"
    version.mkdir(parents=True, exist_ok=True)
    (root / config.name / "config.pbtxt").write_text(text_format.MessageToString(config))
    onnx.save(graph or toy_graph(), str(version / "toy.onnx"))
    shutil.copy(MODEL_PY, version / "model.py")
    return version


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_runner(tmp_path: Path, clock: Optional[FakeClock] = None, **config_kw: object) -> StatefulOnnxRunner:
    config = toy_config(**config_kw)  # type: ignore[arg-type]
    write_toy_model(tmp_path, config)
    runner_config = RunnerConfig.from_model_config(config_as_triton_json(config), tmp_path / TOY_MODEL, "1")
    return StatefulOnnxRunner(runner_config, clock=clock or FakeClock())


def step(corrid: int, x: np.ndarray, start: bool = False, end: bool = False) -> SequenceRequest:
    return SequenceRequest(corrid=corrid, start=start, end=end, inputs={"X": x.reshape(1, WIDTH)})


# ---- unit level ---------------------------------------------------------------------------------
def test_config_reading(tmp_path: Path) -> None:
    runner = make_runner(tmp_path)
    assert runner.input_names == ["X"]
    assert sorted(runner.output_names) == ["N", "Y"]
    assert runner.config.state_ttl_seconds == TTL_S
    assert runner.config.onnx_path == tmp_path / TOY_MODEL / "1" / "toy.onnx"
    controls = ControlNames.from_model_config(config_as_triton_json(toy_config()))
    assert controls == ControlNames(start="START", end="END", corrid="CORRID")


def test_interleaved_sequences_batched_match_reference(tmp_path: Path) -> None:
    runner = make_runner(tmp_path)
    rng = np.random.default_rng(0)
    lengths = {101: 7, 2**63 + 5: 4, 7: 9, 42: 1, 99: 6}
    steps = {cid: random_steps(rng, n) for cid, n in lengths.items()}
    expected = {cid: reference(s) for cid, s in steps.items()}
    position = {cid: 0 for cid in lengths}
    got: Dict[int, List[Tuple[np.ndarray, int]]] = {cid: [] for cid in lengths}
    order = random.Random(1)
    batch_sizes = []
    while any(position[c] < lengths[c] for c in lengths):
        active = [c for c in lengths if position[c] < lengths[c]]
        chosen = order.sample(active, order.randint(1, len(active)))
        batch = []
        for cid in chosen:
            k = position[cid]
            batch.append(step(cid, steps[cid][k], start=k == 0, end=k == lengths[cid] - 1))
            position[cid] += 1
        batch_sizes.append(len(batch))
        for request, result in zip(batch, runner.execute(batch)):
            assert result.ok, result.error
            assert result.outputs["Y"].shape == (1, WIDTH) and result.outputs["N"].shape == (1, 1)
            got[request.corrid].append((result.outputs["Y"][0], int(result.outputs["N"][0, 0])))
    assert max(batch_sizes) > 1
    for cid in lengths:
        assert len(got[cid]) == lengths[cid]
        for (y, n), (y_ref, n_ref) in zip(got[cid], expected[cid]):
            np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
            assert n == n_ref
    assert runner.open_sequences == 0  # every sequence ended


def test_two_steps_of_one_sequence_in_one_call_run_in_order(tmp_path: Path) -> None:
    runner = make_runner(tmp_path)
    xs = random_steps(np.random.default_rng(1), 3)
    batch = [step(5, xs[0], start=True), step(6, xs[0], start=True), step(5, xs[1]), step(5, xs[2])]
    assert plan_waves(batch, lambda r: ()) == [[0, 1], [2], [3]]
    results = runner.execute(batch)
    assert all(r.ok for r in results)
    np.testing.assert_allclose(results[3].outputs["Y"][0], reference(xs)[2][0], rtol=1e-6)
    assert int(results[3].outputs["N"][0, 0]) == 3


def test_unknown_sequence_without_start_fails_alone(tmp_path: Path) -> None:
    runner = make_runner(tmp_path)
    x = np.ones(WIDTH, dtype=np.float32)
    results = runner.execute([step(1, x, start=True), step(2, x), step(3, x, start=True)])
    assert results[0].ok and results[2].ok
    assert results[1].error is not None and "START" in results[1].error and "2" in results[1].error
    assert results[1].outputs == {}
    assert runner.open_sequences == 2


def test_bad_requests_fail_alone(tmp_path: Path) -> None:
    runner = make_runner(tmp_path)
    x = np.ones(WIDTH, dtype=np.float32)
    no_corrid = SequenceRequest(corrid=None, start=True, end=False, inputs={"X": x.reshape(1, WIDTH)})
    missing = SequenceRequest(corrid=2, start=True, end=False, inputs={})
    batch_of_two = SequenceRequest(corrid=3, start=True, end=False, inputs={"X": np.ones((2, WIDTH), np.float32)})
    wrong_dtype = SequenceRequest(corrid=4, start=True, end=False, inputs={"X": np.ones((1, WIDTH), np.float64)})
    results = runner.execute([no_corrid, missing, step(9, x, start=True), batch_of_two, wrong_dtype])
    assert [r.ok for r in results] == [False, False, True, False, False]
    assert "correlation id" in results[0].error
    assert "'X' is missing" in results[1].error
    assert "batch of 1" in results[3].error
    assert "float64" in results[4].error
    assert runner.open_sequences == 1


def test_end_drops_state_and_start_resets(tmp_path: Path) -> None:
    runner = make_runner(tmp_path)
    x = np.full(WIDTH, 2.0, dtype=np.float32)
    runner.execute([step(11, x, start=True)])
    assert runner.open_sequences == 1
    (last,) = runner.execute([step(11, x, end=True)])
    assert last.ok and int(last.outputs["N"][0, 0]) == 2
    assert runner.open_sequences == 0
    (after_end,) = runner.execute([step(11, x)])
    assert not after_end.ok
    (again,) = runner.execute([step(11, x, start=True)])
    np.testing.assert_array_equal(again.outputs["Y"][0], x)
    assert int(again.outputs["N"][0, 0]) == 1
    # START on an id that never ended replaces its state (a new sequence starts clean)
    (restart,) = runner.execute([step(11, x, start=True)])
    assert int(restart.outputs["N"][0, 0]) == 1
    (single,) = runner.execute([step(12, x, start=True, end=True)])
    assert single.ok and runner.open_sequences == 1
    # within one call: a step after END of the same id fails, a step after its START runs
    results = runner.execute([step(13, x, start=True), step(13, x, end=True), step(13, x), step(14, x)])
    assert [r.ok for r in results] == [True, True, False, False]
    assert int(results[1].outputs["N"][0, 0]) == 2


def test_idle_states_expire_after_ttl(tmp_path: Path) -> None:
    clock = FakeClock()
    runner = make_runner(tmp_path, clock=clock)
    x = np.ones(WIDTH, dtype=np.float32)
    runner.execute([step(1, x, start=True), step(2, x, start=True)])
    clock.now += TTL_S * 0.75
    (kept,) = runner.execute([step(2, x)])  # keeps 2 alive
    assert kept.ok
    clock.now += TTL_S * 0.5  # 1 idle for 1.25 TTL, 2 for 0.5 TTL
    results = runner.execute([step(1, x), step(2, x)])
    assert not results[0].ok and "expired" in results[0].error
    assert results[1].ok and int(results[1].outputs["N"][0, 0]) == 3
    assert runner.open_sequences == 1
    clock.now += TTL_S * 2
    assert runner.expire_idle() == [2]
    assert runner.open_sequences == 0


@pytest.mark.parametrize(
    "state_spec, graph_kw, message",
    [
        ([{"name": "acc", "out_name": "out_acc", "dtype": "float32", "dims": [WIDTH]}], {},
         "graph input 'count' is not a config input"),
        (TOY_STATE_SPEC + [{"name": "extra", "out_name": "out_extra", "dtype": "float32", "dims": [2]}], {},
         "state 'extra': the graph has no input 'extra'"),
        ([{**TOY_STATE_SPEC[0], "out_name": "acc_out"}, TOY_STATE_SPEC[1]], {},
         "the graph has no output 'acc_out'"),
        ([{**TOY_STATE_SPEC[0], "dims": [4]}, TOY_STATE_SPEC[1]], {}, "dims [3] in the graph, [4] in state_spec"),
        ([TOY_STATE_SPEC[0], {**TOY_STATE_SPEC[1], "dtype": "int32"}], {},
         "dtype int64 in the graph, int32 in state_spec"),
        (TOY_STATE_SPEC, {"acc_dims": (WIDTH, 1)}, "dims [3, 1] in the graph, [3] in state_spec"),
    ],
)
def test_state_spec_mismatch_is_refused_clearly(
    tmp_path: Path, state_spec: list, graph_kw: dict, message: str
) -> None:
    config = toy_config(state_spec=state_spec)
    write_toy_model(tmp_path, config, toy_graph(**graph_kw))
    runner_config = RunnerConfig.from_model_config(config_as_triton_json(config), tmp_path / TOY_MODEL, "1")
    with pytest.raises(StatefulModelError) as info:
        StatefulOnnxRunner(runner_config)
    assert message in str(info.value)


def test_ttl_shorter_than_triton_idle_timeout_is_refused(tmp_path: Path) -> None:
    config = toy_config(ttl_s=5, idle_us=10_000_000)
    with pytest.raises(StatefulModelError, match="shorter than the sequence batcher's idle timeout"):
        RunnerConfig.from_model_config(config_as_triton_json(config), tmp_path, "1")


def test_missing_onnx_file_is_refused(tmp_path: Path) -> None:
    config = toy_config()
    runner_config = RunnerConfig.from_model_config(config_as_triton_json(config), tmp_path, "1")
    with pytest.raises(StatefulModelError, match="not found"):
        StatefulOnnxRunner(runner_config)


def test_generated_local_state_spec_parses_like_the_contract() -> None:
    """The repository generator's state_spec (local flavour) reads back as the contract's states."""
    preset = next(iter(repository.PRESETS.values()))
    for io in (contract.preprocessor_io(preset), contract.sortformer_io(preset, 16)):
        specs = parse_state_spec(json.dumps(repository.state_spec(io)))
        assert [(s.name, s.out_name, s.dtype.name, s.dims) for s in specs] == [
            (t.name, contract.STATE_OUT_PREFIX + t.name, t.dtype, t.dims) for t in io.states
        ]


# ---- against the real local tritonserver --------------------------------------------------------
N_STREAMS = 6
STREAM_STEPS = 10


@pytest.fixture(scope="module")
def toy_server(tmp_path_factory: pytest.TempPathFactory, triton_server) -> Iterator[object]:
    root = tmp_path_factory.mktemp("toy_repository")
    write_toy_model(root, toy_config())
    yield triton_server(root)


def _stream(url: str, corrid: int, steps: List[np.ndarray], barrier: threading.Barrier,
            out: Dict[int, List[Tuple[np.ndarray, int]]], errors: List[BaseException]) -> None:
    import tritonclient.grpc as grpcclient

    try:
        client = grpcclient.InferenceServerClient(url)
        barrier.wait(timeout=30)
        got = []
        for k, x in enumerate(steps):
            inp = grpcclient.InferInput("X", [1, WIDTH], "FP32")
            inp.set_data_from_numpy(x.reshape(1, WIDTH))
            result = client.infer(
                TOY_MODEL, [inp], sequence_id=corrid,
                sequence_start=k == 0, sequence_end=k == len(steps) - 1,
            )
            got.append((result.as_numpy("Y")[0].copy(), int(result.as_numpy("N")[0, 0])))
        out[corrid] = got
        client.close()
    except BaseException as exc:  # surfaced by the test thread
        errors.append(exc)


def _statistics(url: str) -> Tuple[int, int]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    stats = client.get_inference_statistics(TOY_MODEL).model_stats[0]
    client.close()
    return int(stats.inference_count), int(stats.execution_count)


def test_server_runs_concurrent_sequences_batched(toy_server) -> None:
    rng = np.random.default_rng(7)
    corrids = [(1 << 62) + 17 * k + 3 for k in range(N_STREAMS)]  # large ids: uint64 CORRID
    steps = {cid: random_steps(rng, STREAM_STEPS + k) for k, cid in enumerate(corrids)}
    out: Dict[int, List[Tuple[np.ndarray, int]]] = {}
    errors: List[BaseException] = []
    barrier = threading.Barrier(N_STREAMS)
    before = _statistics(toy_server.grpc_url)
    threads = [
        threading.Thread(target=_stream, args=(toy_server.grpc_url, cid, steps[cid], barrier, out, errors))
        for cid in corrids
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for cid in corrids:
        expected = reference(steps[cid])
        assert len(out[cid]) == len(expected)
        for (y, n), (y_ref, n_ref) in zip(out[cid], expected):
            np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
            assert n == n_ref
    inferences, executions = (a - b for a, b in zip(_statistics(toy_server.grpc_url), before))
    assert inferences == sum(len(s) for s in steps.values())
    assert executions < inferences, f"no batching: {executions} executions for {inferences} inferences"


def test_server_reused_sequence_id_after_end_starts_clean(toy_server) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(toy_server.grpc_url)
    x = np.arange(WIDTH, dtype=np.float32)

    def send(start: bool, end: bool) -> Tuple[np.ndarray, int]:
        inp = grpcclient.InferInput("X", [1, WIDTH], "FP32")
        inp.set_data_from_numpy(x.reshape(1, WIDTH))
        result = client.infer(TOY_MODEL, [inp], sequence_id=4242, sequence_start=start, sequence_end=end)
        return result.as_numpy("Y")[0], int(result.as_numpy("N")[0, 0])

    send(True, False)
    y, n = send(False, True)
    np.testing.assert_allclose(y, 2 * x)
    assert n == 2
    y, n = send(True, False)
    np.testing.assert_allclose(y, x)
    assert n == 1
    send(False, True)
    with pytest.raises(InferenceServerException, match="START"):
        send(False, False)  # ended: Triton refuses a request without START
    client.close()
