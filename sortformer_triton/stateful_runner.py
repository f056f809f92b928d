"""Run a stateful ONNX graph per Triton sequence, as the onnxruntime backend's implicit state would.

Production serves the stateful graphs with Triton's onnxruntime backend and ``sequence_batching {
state [...] }``: Triton keeps each sequence's state tensors, feeds zeros on the first request
(``initial_state``) and afterwards the previous request's ``out_<name>``. The tritonserver of the
``nvidia-pytriton`` wheel has only the Python backend, which cannot hold implicit state, so locally a
Python-backend model (``python_backend/stateful_onnx/model.py``) runs the *same* graph through this
module, keeping the state per correlation id itself.

Semantics kept identical to the implicit-state contract:

- START: the state is zeros (a still-open sequence with the same id is replaced);
- a request of an unknown id without START fails, and only that request;
- the state output of a request becomes the state input of the sequence's next request;
- END: the state is dropped after the request;
- idle sequences: Triton never tells a Python model about its idle timeout, so states idle longer
  than ``state_ttl_seconds`` (which must be >= ``max_sequence_idle_microseconds``) are dropped.

Requests of different sequences that Triton hands over together (the ``oldest`` strategy batches
them) run as ONE batched onnxruntime call: the graph is vectorized over the batch by design.

This module imports numpy and onnxruntime only (no Triton), so it is unit-tested directly.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .contract import START, STATE_OUT_PREFIX
from .sequences import SequenceStore, config_parameters, ttl_from_model_config

DEFAULT_ONNX_FILE = "model.onnx"

# dtype spellings accepted in state_spec: numpy names and Triton config names
_TRITON_TO_NUMPY = {
    "TYPE_BOOL": "bool", "TYPE_UINT8": "uint8", "TYPE_UINT16": "uint16", "TYPE_UINT32": "uint32",
    "TYPE_UINT64": "uint64", "TYPE_INT8": "int8", "TYPE_INT16": "int16", "TYPE_INT32": "int32",
    "TYPE_INT64": "int64", "TYPE_FP16": "float16", "TYPE_FP32": "float32", "TYPE_FP64": "float64",
}
_ORT_TO_NUMPY = {
    "tensor(bool)": "bool", "tensor(uint8)": "uint8", "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32", "tensor(uint64)": "uint64", "tensor(int8)": "int8",
    "tensor(int16)": "int16", "tensor(int32)": "int32", "tensor(int64)": "int64",
    "tensor(float16)": "float16", "tensor(float)": "float32", "tensor(double)": "float64",
}
_CONTROL_KINDS = {
    "CONTROL_SEQUENCE_START": "start",
    "CONTROL_SEQUENCE_END": "end",
    "CONTROL_SEQUENCE_CORRID": "corrid",
}

Logger = Callable[[str], None]


class StatefulModelError(ValueError):
    """The model config, its state_spec and the ONNX graph do not fit together."""


# ---- configuration --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StateSpec:
    """One state tensor: graph input ``name``, graph output ``out_name``, per-sequence dims.

    In the ``state_spec`` JSON the output may be spelled ``out_name`` or ``output_name``.
    """

    name: str
    out_name: str
    dtype: np.dtype
    dims: Tuple[int, ...]

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "StateSpec":
        try:
            name = str(obj["name"])
            out_name = _out_name(obj, name)
            dtype = to_numpy_dtype(str(obj["dtype"]))
            dims = tuple(int(d) for d in obj["dims"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StatefulModelError(f"bad state_spec entry {obj!r}: {exc}") from None
        if not dims or any(d < 1 for d in dims):
            raise StatefulModelError(f"state {name!r}: dims must be fixed and >= 1, got {list(dims)}")
        return cls(name, out_name, dtype, dims)

    def zeros(self) -> np.ndarray:
        """The initial state (Triton's ``initial_state { zero_data }``)."""
        return np.zeros(self.dims, dtype=self.dtype)


def _out_name(obj: Mapping[str, Any], name: str) -> str:
    """The state output's name: ``out_name`` (or ``output_name``), else the contract's prefix rule."""
    given = {str(obj[k]) for k in ("out_name", "output_name") if k in obj}
    if len(given) > 1:
        raise ValueError(f"out_name and output_name disagree: {sorted(given)}")
    return given.pop() if given else STATE_OUT_PREFIX + name


def to_numpy_dtype(name: str) -> np.dtype:
    """A numpy dtype from a numpy name (``float32``) or a Triton config name (``TYPE_FP32``)."""
    try:
        return np.dtype(_TRITON_TO_NUMPY.get(name, name))
    except TypeError:
        raise StatefulModelError(f"unknown dtype {name!r}") from None


def parse_state_spec(text: str) -> Tuple[StateSpec, ...]:
    """Parse the ``state_spec`` model parameter: a JSON list of {name, out_name, dtype, dims}."""
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StatefulModelError(f"state_spec is not JSON: {exc}") from None
    if not isinstance(entries, list) or not entries:
        raise StatefulModelError("state_spec must be a non-empty JSON list")
    specs = tuple(StateSpec.from_json(e) for e in entries)
    names = [s.name for s in specs] + [s.out_name for s in specs]
    if len(set(names)) != len(names):
        raise StatefulModelError(f"state_spec names are not unique: {names}")
    return specs


@dataclasses.dataclass(frozen=True)
class ControlNames:
    """Names of the sequence batcher's control tensors (START, END, CORRID in our configs)."""

    start: str
    end: str
    corrid: str

    @classmethod
    def from_model_config(cls, model_config: Mapping[str, Any]) -> "ControlNames":
        found: Dict[str, str] = {}
        seq = model_config.get("sequence_batching") or {}
        for control_input in seq.get("control_input", []):
            for control in control_input.get("control", []):
                # text_format omits the enum's default value, CONTROL_SEQUENCE_START
                role = _CONTROL_KINDS.get(str(control.get("kind", "CONTROL_SEQUENCE_START")))
                if role is not None:
                    found[role] = str(control_input["name"])
        missing = [k for k in ("start", "end", "corrid") if k not in found]
        if missing:
            raise StatefulModelError(
                "sequence_batching must declare control inputs for "
                + ", ".join(f"CONTROL_SEQUENCE_{m.upper()}" for m in missing)
            )
        return cls(**found)


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    """What the runner needs, read from the model's config.pbtxt (as Triton hands it over)."""

    onnx_path: Path
    states: Tuple[StateSpec, ...]
    state_ttl_seconds: float
    intra_op_threads: int = 0
    input_dtypes: Optional[Mapping[str, np.dtype]] = None  # config inputs (checked against the graph)
    output_dtypes: Optional[Mapping[str, np.dtype]] = None  # config outputs

    @classmethod
    def from_model_config(
        cls, model_config: Mapping[str, Any], model_repository: str | Path, model_version: str | int
    ) -> "RunnerConfig":
        """Read ``parameters`` (onnx_file, state_spec, state_ttl_seconds, intra_op_threads)."""
        params = config_parameters(model_config)
        if "state_spec" not in params:
            raise StatefulModelError("model parameter 'state_spec' is missing")
        try:
            ttl = ttl_from_model_config(model_config)
        except ValueError as exc:
            raise StatefulModelError(str(exc)) from None
        onnx_path = Path(model_repository) / str(model_version) / params.get("onnx_file", DEFAULT_ONNX_FILE)
        return cls(
            onnx_path=onnx_path,
            states=parse_state_spec(params["state_spec"]),
            state_ttl_seconds=ttl,
            intra_op_threads=int(params.get("intra_op_threads", 0)),
            input_dtypes=_config_tensor_dtypes(model_config.get("input", [])),
            output_dtypes=_config_tensor_dtypes(model_config.get("output", [])),
        )


def _config_tensor_dtypes(tensors: Iterable[Mapping[str, Any]]) -> Dict[str, np.dtype]:
    return {str(t["name"]): to_numpy_dtype(str(t["data_type"])) for t in tensors}


# ---- requests and results -------------------------------------------------------------------------
@dataclasses.dataclass
class SequenceRequest:
    """One request of one sequence: its control flags and ordinary inputs (leading batch dim 1)."""

    corrid: Optional[int]
    start: bool
    end: bool
    inputs: Dict[str, np.ndarray]


@dataclasses.dataclass
class SequenceResult:
    """Ordinary outputs of one request (leading batch dim 1), or the error that request gets."""

    outputs: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    error: Optional[str] = None
    server_fault: bool = False  # the error is the server's (onnxruntime failed), not the request's

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclasses.dataclass(frozen=True)
class _GraphTensor:
    name: str
    dtype: np.dtype
    shape: Tuple[Any, ...]  # ints for fixed dims, str/None for symbolic ones (batch first)


# ---- the runner -----------------------------------------------------------------------------------
class StatefulOnnxRunner:
    """One onnxruntime session plus the per-sequence state store of one model instance.

    Not thread-safe: Triton calls a Python model's ``execute`` one batch at a time per instance, and a
    sequence stays on the instance it started on.
    """

    def __init__(
        self,
        config: RunnerConfig,
        clock: Callable[[], float] = time.monotonic,
        log: Optional[Logger] = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._log = log or (lambda message: None)
        self._session = _make_session(config.onnx_path, config.intra_op_threads)
        graph_inputs = {t.name: t for t in map(_graph_tensor, self._session.get_inputs())}
        graph_outputs = {t.name: t for t in map(_graph_tensor, self._session.get_outputs())}
        validate_graph(config, graph_inputs, graph_outputs)
        state_in = {s.name for s in config.states}
        state_out = {s.out_name for s in config.states}
        self._start_input = graph_inputs.get(START)
        self._inputs = {n: t for n, t in graph_inputs.items() if n not in state_in and n != START}
        self._outputs = [n for n in graph_outputs if n not in state_out]
        self._store: SequenceStore[Dict[str, np.ndarray]] = SequenceStore(config.state_ttl_seconds, clock)

    @property
    def input_names(self) -> List[str]:
        """Ordinary graph inputs every request must carry (state and START excluded)."""
        return list(self._inputs)

    @property
    def output_names(self) -> List[str]:
        """Ordinary graph outputs each response carries (state outputs excluded)."""
        return list(self._outputs)

    @property
    def open_sequences(self) -> int:
        return len(self._store)

    def expire_idle(self, now: Optional[float] = None) -> List[int]:
        """Drop the states of sequences idle longer than the TTL; their ids."""
        expired = list(self._store.expire(self._clock() if now is None else now))
        if expired:
            self._log(
                f"dropped the state of {len(expired)} sequence(s) idle > "
                f"{self.config.state_ttl_seconds:g} s without END: {expired[:8]}"
            )
        return expired

    def execute(self, requests: Sequence[SequenceRequest]) -> List[SequenceResult]:
        """Run a batch of requests (any mix of sequences); one result per request, in order."""
        now = self._clock()
        self.expire_idle(now)
        results = [SequenceResult() for _ in requests]
        runnable: List[int] = []
        for i, request in enumerate(requests):
            error = self._check(request)
            if error is None:
                runnable.append(i)
            else:
                results[i].error = error
        for wave in plan_waves([requests[i] for i in runnable], self._shape_key):
            # looked up per wave: an earlier wave of this call may have started or ended a sequence
            ready = [i for i in (runnable[j] for j in wave) if self._has_state(requests[i], results[i])]
            if ready:
                self._run_wave(ready, requests, results)
        return results

    # ---- internals --------------------------------------------------------------------------------
    def _check(self, request: SequenceRequest) -> Optional[str]:
        """Why this request cannot run (None when it can)."""
        if request.corrid is None:
            return "the request has no correlation id (CORRID): send it as part of a sequence"
        for name, spec in self._inputs.items():
            value = request.inputs.get(name)
            if value is None:
                return f"input {name!r} is missing"
            if value.dtype != spec.dtype:
                return f"input {name!r} has dtype {value.dtype}, the graph expects {spec.dtype}"
            if value.ndim != len(spec.shape) or value.shape[0] != 1:
                return (
                    f"input {name!r} has shape {list(value.shape)}; expected a batch of 1 and "
                    f"{len(spec.shape) - 1} more dims"
                )
            for got, want in zip(value.shape[1:], spec.shape[1:]):
                if isinstance(want, int) and got != want:
                    return f"input {name!r} has shape {list(value.shape)}, the graph expects {list(spec.shape)}"
        return None

    def _shape_key(self, request: SequenceRequest) -> Tuple[Tuple[int, ...], ...]:
        return tuple(tuple(request.inputs[n].shape) for n in self._inputs)

    def _has_state(self, request: SequenceRequest, result: SequenceResult) -> bool:
        """START, or a live state; else this request (only) fails, as Triton fails an unknown id."""
        if request.start or self._store.get(request.corrid) is not None:
            return True
        result.error = (
            f"sequence {request.corrid} has no state: its first request must carry START "
            f"(or it ended, or it was idle > {self.config.state_ttl_seconds:g} s and expired)"
        )
        return False

    def _states_of(self, request: SequenceRequest) -> Dict[str, np.ndarray]:
        if request.start:
            return {s.name: s.zeros() for s in self.config.states}
        state = self._store.get(request.corrid)
        assert state is not None  # _has_state ran for this wave
        return state

    def _run_wave(
        self, indices: List[int], requests: Sequence[SequenceRequest], results: List[SequenceResult]
    ) -> None:
        """One batched onnxruntime call for requests of distinct sequences; scatter the results."""
        batch = [requests[i] for i in indices]
        states = [self._states_of(r) for r in batch]
        feeds: Dict[str, np.ndarray] = {
            name: np.concatenate([r.inputs[name] for r in batch], axis=0) for name in self._inputs
        }
        for spec in self.config.states:
            feeds[spec.name] = np.stack([s[spec.name] for s in states], axis=0)
        if self._start_input is not None:
            flags = np.array([[1 if r.start else 0] for r in batch], dtype=self._start_input.dtype)
            feeds[START] = flags.reshape((len(batch), *(1,) * (len(self._start_input.shape) - 1)))
        fetch = self._outputs + [s.out_name for s in self.config.states]
        try:
            values = dict(zip(fetch, self._session.run(fetch, feeds)))
        except Exception as exc:  # onnxruntime raises several unrelated types
            for i, request in zip(indices, batch):
                results[i].error = f"onnxruntime failed on a batch of {len(batch)}: {exc}"
                results[i].server_fault = True
                if request.start:
                    self._store.pop(request.corrid)  # the sequence never started
            return
        now = self._clock()
        for row, (i, request) in enumerate(zip(indices, batch)):
            results[i].outputs = {name: values[name][row : row + 1] for name in self._outputs}
            if request.end:
                self._store.pop(request.corrid)
                continue
            new_state = {s.name: values[s.out_name][row].copy() for s in self.config.states}
            if request.start:  # stored only now: a failed first step leaves no half-made sequence
                self._store.start(request.corrid, lambda state=new_state: state, now)
            else:
                self._store.get_or_create(request.corrid, dict, now).update(new_state)


def plan_waves(
    requests: Sequence[SequenceRequest], shape_key: Callable[[SequenceRequest], Any]
) -> List[List[int]]:
    """Split requests into batches that can run as one call, keeping each sequence's order.

    A batch holds at most one request per sequence (its state depends on the previous request) and
    requests of one input shape (needed to stack them). Triton's oldest strategy already sends at most
    one request per sequence, so this is normally a single batch.
    """
    waves: List[List[int]] = []
    wave_ids: List[set] = []
    wave_keys: List[Any] = []
    last_wave: Dict[Optional[int], int] = {}
    for i, request in enumerate(requests):
        key = shape_key(request)
        placed = None
        for w in range(last_wave.get(request.corrid, -1) + 1, len(waves)):
            if wave_keys[w] == key and request.corrid not in wave_ids[w]:
                placed = w
                break
        if placed is None:
            waves.append([])
            wave_ids.append(set())
            wave_keys.append(key)
            placed = len(waves) - 1
        waves[placed].append(i)
        wave_ids[placed].add(request.corrid)
        last_wave[request.corrid] = placed
    return waves


# ---- graph checks ---------------------------------------------------------------------------------
def _make_session(onnx_path: Path, intra_op_threads: int) -> Any:
    import onnxruntime as ort

    if not onnx_path.is_file():
        raise StatefulModelError(f"ONNX file {onnx_path} not found (model parameter onnx_file)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(int(intra_op_threads), 0)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])


def _graph_tensor(node_arg: Any) -> _GraphTensor:
    type_name = str(node_arg.type)
    if type_name not in _ORT_TO_NUMPY:
        raise StatefulModelError(f"graph tensor {node_arg.name!r} has unsupported type {type_name}")
    return _GraphTensor(node_arg.name, np.dtype(_ORT_TO_NUMPY[type_name]), tuple(node_arg.shape))


def validate_graph(
    config: RunnerConfig, inputs: Mapping[str, _GraphTensor], outputs: Mapping[str, _GraphTensor]
) -> None:
    """Check state_spec and the model config against the ONNX graph; one clear message per problem."""
    problems: List[str] = []
    for spec in config.states:
        for role, name, tensors in (("input", spec.name, inputs), ("output", spec.out_name, outputs)):
            tensor = tensors.get(name)
            if tensor is None:
                problems.append(
                    f"state {spec.name!r}: the graph has no {role} {name!r} "
                    f"(graph {role}s: {sorted(tensors)})"
                )
                continue
            problems += _state_tensor_problems(spec, role, tensor)
    state_names = {s.name for s in config.states} | {s.out_name for s in config.states}
    for name, tensor in inputs.items():
        if name not in state_names and not _batched(tensor):
            problems.append(f"input {name!r}: the graph's first dim must be a dynamic batch, got {list(tensor.shape)}")
    if START in inputs and inputs[START].dtype.kind not in "biu":
        problems.append(f"input {START!r} must be an integer or bool tensor, got {inputs[START].dtype}")
    problems += _config_problems(config, inputs, outputs, state_names)
    if problems:
        raise StatefulModelError(f"{config.onnx_path}: " + "; ".join(problems))


def _batched(tensor: _GraphTensor) -> bool:
    return len(tensor.shape) >= 1 and not isinstance(tensor.shape[0], int)


def _state_tensor_problems(spec: StateSpec, role: str, tensor: _GraphTensor) -> List[str]:
    problems: List[str] = []
    where = f"state {spec.name!r} ({role} {tensor.name!r})"
    if tensor.dtype != spec.dtype:
        problems.append(f"{where}: dtype {tensor.dtype} in the graph, {spec.dtype} in state_spec")
    if not _batched(tensor):
        problems.append(f"{where}: the graph's first dim must be a dynamic batch, got {list(tensor.shape)}")
    graph_dims = tensor.shape[1:]
    fits = len(graph_dims) == len(spec.dims) and all(
        not isinstance(g, int) or g == d for g, d in zip(graph_dims, spec.dims)
    )
    if not fits:
        problems.append(f"{where}: dims {list(graph_dims)} in the graph, {list(spec.dims)} in state_spec")
    return problems


def _config_problems(
    config: RunnerConfig,
    inputs: Mapping[str, _GraphTensor],
    outputs: Mapping[str, _GraphTensor],
    state_names: set,
) -> List[str]:
    """The config's inputs must feed every ordinary graph input; its outputs must exist in the graph."""
    problems: List[str] = []
    if config.input_dtypes is not None:
        for name, tensor in inputs.items():
            if name in state_names or name == START:
                continue
            want = config.input_dtypes.get(name)
            if want is None:
                problems.append(f"graph input {name!r} is not a config input")
            elif want != tensor.dtype:
                problems.append(f"input {name!r}: {want} in the config, {tensor.dtype} in the graph")
    if config.output_dtypes is not None:
        for name, want in config.output_dtypes.items():
            tensor = outputs.get(name)
            if tensor is None or name in state_names:
                problems.append(f"config output {name!r} is not an ordinary graph output")
            elif want != tensor.dtype:
                problems.append(f"output {name!r}: {want} in the config, {tensor.dtype} in the graph")
    return problems
