"""Would NGC's tritonserver load this production repository? The onnxruntime backend's load-time rules.

The onnxruntime backend cannot run on these machines, so a production repository is only as good as
this check. It applies what Triton 2.51 (NGC 24.10) with the r24.10 onnxruntime backend and onnxruntime
1.19 checks when it loads a model (``src/onnxruntime.cc``: ``AutoCompleteMaxBatch``, ``ValidateInputs``,
``ValidateOutputs``, ``Validate*SequenceControl``; ``CompareDimsSupported`` in ``onnxruntime_utils.cc``;
core ``sequence_state.cc`` for the state pairing), and explains every violation in Triton's own words,
with the rule that produced it:

========================  ==================================================================================
rule                      what the server does
========================  ==================================================================================
``model-file``            loads ``<version>/<default_model_filename>``; a missing file fails the model
``ir-version``            onnxruntime 1.19 loads ONNX IR <= 10 ("Unsupported model IR version")
``opset``                 onnxruntime 1.19 implements the default domain up to opset 21
``onnxruntime-load``      the graph must load in onnxruntime at all (session creation)
``batch-dim``             with max_batch_size > 0 every graph input and output needs a dynamic first dim
``input-count``           graph inputs = config inputs + control inputs + state inputs, exactly
``input``                 every config input exists in the graph with the same dtype; dims compared
                          loosely (a dynamic graph dim accepts any config value)
``output``                every config output exists in the graph with the same dtype; dims compared
                          **exactly** (a dynamic graph dim matches only -1 in the config)
``control``               every sequence control input exists, has dims [1] and the control's dtype
``state``                 every implicit state's input and output exist in the graph with its dtype and
                          (for this project) its fixed dims
``initial-state``         every state has one zero/data initial_state of its dtype and dims (otherwise a
                          sequence's first request reads whatever the slot held)
``state-pairing``         Triton pairs state inputs and outputs by position in name-sorted order
========================  ==================================================================================

Graphs are read from the ONNX file: declared dtypes and dims (a symbolic dim is -1, as onnxruntime reports
it), IR version and opsets; onnxruntime may infer a symbolic *output* dim, but whether it can depends on its
version, so an output dim counts as static only where the graph declares it. Python-backend models and ensembles are checked
by ``repository.validate`` (config level); here only whether their files exist.

``python -m sortformer_triton.validator REPOSITORY`` prints every violation and exits 1 if there is any.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from tritonclient.grpc import model_config_pb2 as mc

from . import repository

# NGC 24.10: Triton 2.51.0, onnxruntime backend r24.10, onnxruntime 1.19.2
TRITON_RELEASE = "NGC 24.10 (Triton 2.51, onnxruntime backend r24.10, onnxruntime 1.19.2)"
ORT_VERSION = "1.19.2"  # NGC 24.10's; tests load every production graph in it (a venv of its own)
MAX_IR_VERSION = 10
MAX_OPSET = 21
KNOWN_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")

# onnx.TensorProto element types -> Triton config data types
_ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16",
                   6: "TYPE_INT32", 7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16",
                   11: "TYPE_FP64", 12: "TYPE_UINT32", 13: "TYPE_UINT64", 16: "TYPE_BF16"}
_CONTROL_DTYPE = {"int32_false_true": "TYPE_INT32", "fp32_false_true": "TYPE_FP32", "bool_false_true": "TYPE_BOOL"}

Dims = Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Violation:
    """One reason the server would refuse (or silently mis-serve) a model."""

    model: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"model '{self.model}' [{self.rule}]: {self.message}"


class ProductionRepositoryError(ValueError):
    """A production repository that NGC's tritonserver would not load; carries every violation."""

    def __init__(self, root: Path, violations: Sequence[Violation]):
        self.root = Path(root)
        self.violations = list(violations)
        lines = "\n".join(f"  - {v}" for v in self.violations)
        super().__init__(f"{root}: {len(self.violations)} violation(s) of the onnxruntime backend's load-time "
                         f"rules ({TRITON_RELEASE}); the server would refuse this repository:\n{lines}")


@dataclasses.dataclass(frozen=True)
class GraphIO:
    """An ONNX graph as the onnxruntime backend sees it: names -> (Triton dtype, dims with -1)."""

    ir_version: int
    opsets: Mapping[str, int]
    inputs: Mapping[str, Tuple[str, Dims]]
    outputs: Mapping[str, Tuple[str, Dims]]


def _shape(dims: Iterable[object]) -> Dims:
    return tuple(d if isinstance(d, int) and d > 0 else -1 for d in dims)


def _fmt(dims: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


def read_graph(path: Path, load_check: bool = True) -> Tuple[Optional[GraphIO], List[Tuple[str, str]]]:
    """The graph's declared I/O (names, Triton dtypes, dims with -1 for a symbolic dim), or the (rule,
    message) problems that stop it loading.

    The backend asks onnxruntime for the I/O; onnxruntime reports the declared shapes, and for an output
    it may fill a symbolic dim in by its own shape inference. Whether it can depends on its version, so
    the rules are applied to the *declared* shapes: an output dim counts as static only when the graph
    says so (this project's export declares every dim). ``load_check`` also loads the graph in the
    installed onnxruntime (tests/test_validator.py loads every production graph in 1.19.2 itself).
    """
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    ir_version = int(proto.ir_version)
    opsets = {(o.domain or ""): int(o.version) for o in proto.opset_import}
    problems: List[Tuple[str, str]] = []
    if ir_version > MAX_IR_VERSION:
        problems.append(("ir-version", f"Unsupported model IR version: {ir_version}, max supported IR "
                                       f"version: {MAX_IR_VERSION} (write the graph with ir_version <= "
                                       f"{MAX_IR_VERSION})"))
    default = max(opsets.get("", 0), opsets.get("ai.onnx", 0))
    if default > MAX_OPSET:
        problems.append(("opset", f"the graph imports opset {default} of the default domain; onnxruntime "
                                  f"{ORT_VERSION} implements up to opset {MAX_OPSET}"))
    unknown = sorted(d for d in opsets if d not in KNOWN_DOMAINS)
    if unknown:
        problems.append(("opset", f"operator domains {unknown} are not implemented by onnxruntime {ORT_VERSION}"))
    initializers = {t.name for t in proto.graph.initializer}

    def table(values) -> Dict[str, Tuple[str, Dims]]:
        out = {}
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out[v.name] = (_ONNX_TO_TRITON.get(t.elem_type, f"onnx elem_type {t.elem_type}"), _shape(dims))
        return out

    io = GraphIO(ir_version=ir_version, opsets=opsets, inputs=table(proto.graph.input),
                 outputs=table(proto.graph.output))
    del proto  # weights stay on disk; onnxruntime reads the file itself
    if problems:
        return None, problems
    if load_check:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # loading is the check
        options.log_severity_level = 3
        try:
            ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - any load failure is the violation
            return None, [("onnxruntime-load", f"onnxruntime {ort.__version__} cannot load {path.name}: {exc}")]
    return io, []


def _dtype(value: int) -> str:
    return mc.DataType.Name(value)


def _compare_dims(model: str, tensor: str, graph_dims: Dims, config_dims: Sequence[int], batching: bool,
                  exact: bool) -> Optional[str]:
    """CompareDimsSupported: None when Triton accepts, else its message."""
    full = ((-1,) if batching else ()) + tuple(config_dims)
    ok = len(graph_dims) == len(full) and all(
        g == c for g, c in zip(graph_dims, full) if exact or g != -1)
    if ok:
        return None
    batch_note = (" (an initial batch dimension because max_batch_size > 0 followed by the explicit tensor "
                  "shape, making complete shape " + _fmt(full) + ")") if batching else ""
    hint = ("; outputs are compared exactly: every non-batch dim of the graph output must be static and equal "
            "the config" if exact and -1 in graph_dims[1 if batching else 0:] else "")
    return (f"tensor '{tensor}': the model expects {len(graph_dims)} dimensions (shape {_fmt(graph_dims)}) but "
            f"the model configuration specifies {len(full)} dimensions{batch_note}{hint}")


def _controls(config: mc.ModelConfig) -> List[Tuple[str, str]]:
    """(tensor name, Triton dtype) of every sequence control input."""
    out = []
    for control_input in config.sequence_batching.control_input:
        for control in control_input.control:
            if control.kind == mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_CORRID:
                out.append((control_input.name, _dtype(control.data_type)))
            else:
                which = next((f for f in _CONTROL_DTYPE if len(getattr(control, f))), "int32_false_true")
                out.append((control_input.name, _CONTROL_DTYPE[which]))
    return out


def check_onnx_model(config: mc.ModelConfig, graph: GraphIO) -> List[Violation]:
    """Every load-time rule of the onnxruntime backend for one config against its graph."""
    name = config.name
    found: List[Violation] = []

    def bad(rule: str, message: str) -> None:
        found.append(Violation(name, rule, message))

    batching = config.max_batch_size > 0
    if batching:
        no_batch = [n for n, (_, d) in {**graph.inputs, **graph.outputs}.items() if not d or d[0] != -1]
        if no_batch:
            bad("batch-dim", f"autofill failed for model '{name}': model does not support batching while non-zero "
                             f"max_batch_size is specified (tensors without a dynamic first dimension: "
                             f"{sorted(no_batch)})")
    sb = config.sequence_batching
    states = list(sb.state) if config.HasField("sequence_batching") else []
    controls = _controls(config) if config.HasField("sequence_batching") else []
    expected = len([t for t in config.input if not t.optional]) + len(controls) + len(states)
    if len(graph.inputs) != expected:
        bad("input-count", f"unable to load model '{name}', configuration expects {expected} inputs, model "
                           f"provides {len(graph.inputs)} (config inputs {[t.name for t in config.input]}, "
                           f"controls {[c for c, _ in controls]}, states {[s.input_name for s in states]}; "
                           f"graph inputs {sorted(graph.inputs)})")
    for side, tensors, table, exact in (("input", config.input, graph.inputs, False),
                                        ("output", config.output, graph.outputs, True)):
        for t in tensors:
            if t.name not in table:
                bad(side, f"unexpected inference {side} '{t.name}', allowed {side}s are: "
                          f"{', '.join(sorted(table))}")
                continue
            dtype, dims = table[t.name]
            if dtype != _dtype(t.data_type):
                bad(side, f"unable to load model '{name}', configuration expects datatype {_dtype(t.data_type)} "
                          f"for {side} '{t.name}', model provides {dtype}")
            problem = _compare_dims(name, t.name, dims, list(t.dims), batching, exact)
            if problem:
                bad(side, f"model '{name}', {problem}")
    for control, dtype in controls:
        if control not in graph.inputs:
            bad("control", f"configuration specified sequence control '{control}', but model does not provide "
                           "that input")
            continue
        g_dtype, g_dims = graph.inputs[control]
        debatched = g_dims[1:] if batching else g_dims
        if tuple(debatched) != (1,):
            bad("control", f"unable to load model '{name}', sequence control '{control}' in model has dims "
                           f"{_fmt(debatched)} but dims [1] is expected")
        if g_dtype != dtype:
            bad("control", f"unable to load model '{name}', sequence control '{control}', the model expects "
                           f"data-type {g_dtype} but the model configuration specifies data-type {dtype}")
    for s in states:
        want = _dtype(s.data_type)
        for side, tensor, table in (("input", s.input_name, graph.inputs), ("output", s.output_name, graph.outputs)):
            if tensor not in table:
                bad("state", f"unexpected inference {side} '{tensor}' (state {side} of '{s.input_name}'), allowed "
                             f"{side}s are: {', '.join(sorted(table))}")
                continue
            dtype, dims = table[tensor]
            if dtype != want:
                bad("state", f"unable to load model '{name}', configuration expects datatype {want} for {side} "
                             f"state '{tensor}', model provides {dtype}")
            problem = _compare_dims(name, tensor, dims, list(s.dims), batching, exact=False)
            if problem or -1 in s.dims:
                bad("state", f"state {side} '{tensor}' must have the fixed dims {_fmt(s.dims)} in the graph "
                             f"(Triton hands the state back with the config's dims): {problem or 'dims are -1'}")
        if len(s.initial_state) != 1:
            bad("initial-state", f"state '{s.input_name}' has {len(s.initial_state)} initial_state entries; "
                                 "without one (zero_data) a sequence's first request reads whatever its slot held")
        else:
            init = s.initial_state[0]
            if init.data_type != s.data_type or list(init.dims) != list(s.dims):
                bad("initial-state", f"initial_state of '{s.input_name}' is {_dtype(init.data_type)} "
                                     f"{_fmt(init.dims)}, the state is {want} {_fmt(s.dims)}")
            if init.WhichOneof("state_data") is None:
                bad("initial-state", f"initial_state of '{s.input_name}' sets neither zero_data nor data_file")
    ins, outs = sorted(s.input_name for s in states), sorted(s.output_name for s in states)
    for s in states:
        i = ins.index(s.input_name)
        if outs.index(s.output_name) != i:
            bad("state-pairing", f"Triton pairs state input '{s.input_name}' with output '{outs[i]}' (position "
                                 f"{i} of both in name-sorted order, server issue #8586), not with the declared "
                                 f"'{s.output_name}': the state would be swapped or refused; name every output "
                                 "state with one shared prefix")
    return found


def _version_dir(model_dir: Path) -> Optional[Path]:
    versions = sorted((d for d in model_dir.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
    return versions[-1] if versions else None


def validate_repository(root: Path) -> List[Violation]:
    """Every violation of the onnxruntime backend's load-time rules in a production repository."""
    root = Path(root)
    found: List[Violation] = []
    configs = sorted(root.glob(f"*/{repository.CONFIG_FILE}"))
    if not configs:
        return [Violation(root.name, "model-file", f"no model configs under {root}")]
    for config_path in configs:
        model_dir = config_path.parent
        try:
            config = repository.parse(config_path.read_text())
        except Exception as exc:  # noqa: BLE001 - Triton refuses an unparsable config too
            found.append(Violation(model_dir.name, "config", f"config.pbtxt does not parse: {exc}"))
            continue
        version = _version_dir(model_dir)
        if version is None:
            found.append(Violation(config.name, "model-file", f"no numeric version directory in {model_dir}"))
            continue
        if config.platform == "ensemble":
            continue
        if config.backend == "python":
            if not (version / "model.py").is_file():
                found.append(Violation(config.name, "model-file", f"Python backend model without {version}/model.py"))
            continue
        if config.backend != "onnxruntime" and config.platform != "onnxruntime_onnx":
            continue
        model_file = version / (config.default_model_filename or "model.onnx")
        if not model_file.is_file():
            found.append(Violation(config.name, "model-file", f"unable to find '{model_file}' for model "
                                                              f"'{config.name}'"))
            continue
        graph, problems = read_graph(model_file)
        found += [Violation(config.name, rule, message) for rule, message in problems]
        if graph is not None:
            found += check_onnx_model(config, graph)
    return found


def require_valid(root: Path, shown_as: Optional[Path] = None) -> None:
    """Raise ProductionRepositoryError listing every violation (export calls this before it publishes
    a staged repository; ``shown_as`` names it by where it was going to be written)."""
    violations = validate_repository(root)
    if violations:
        raise ProductionRepositoryError(shown_as or root, violations)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sortformer_triton.validator",
                                 description="Check a production model repository against the onnxruntime "
                                             f"backend's load-time rules of {TRITON_RELEASE}.")
    ap.add_argument("repository", type=Path, help="e.g. build/tiny/production or /models/production")
    args = ap.parse_args(argv)
    violations = validate_repository(args.repository)
    for v in violations:
        print(v)
    if violations:
        print(f"{args.repository}: {len(violations)} violation(s); NGC's tritonserver would not load it",
              file=sys.stderr)
        return 1
    print(f"{args.repository}: every onnxruntime model passes the load-time rules of {TRITON_RELEASE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
