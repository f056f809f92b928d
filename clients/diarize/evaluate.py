"""``diarize eval``: DER and JER of hypothesis RTTMs against reference RTTMs (pyannote.metrics).

Collar convention: ``collar`` is the NIST md-eval / NeMo one, the time excluded on *each side* of every
reference boundary (``--collar 0.25`` = +-0.25 s). pyannote.metrics' ``collar`` is the total width, so
``2 * collar`` is passed to it (as NeMo's ``score_labels`` does). The scored region of a recording is
the extent of its reference and hypothesis turns (pyannote's own approximation when no UEM is given).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from clients.sortformer_client.rttm import Turn, read_rttm, turns_by_uri


@dataclasses.dataclass(frozen=True)
class FileScore:
    uri: str
    scored_s: float  # reference speech scored (after collars / overlap skipping)
    missed_s: float
    false_alarm_s: float
    confusion_s: float
    der: float
    jer: float
    hyp_found: bool = True

    def as_dict(self) -> Dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class EvalReport:
    files: List[FileScore]
    total: FileScore
    collar: float
    skip_overlap: bool
    missing_hyp: List[str]
    extra_hyp: List[str]

    def as_dict(self) -> Dict[str, object]:
        return {
            "collar": self.collar, "skip_overlap": self.skip_overlap,
            "files": [f.as_dict() for f in self.files], "total": self.total.as_dict(),
            "missing_hypotheses": self.missing_hyp, "hypotheses_without_reference": self.extra_hyp,
        }


def load_rttms(path: os.PathLike | str) -> Dict[str, List[Turn]]:
    """Turns by recording id from one RTTM file or every ``*.rttm`` in a directory (recursively)."""
    root = Path(path)
    if root.is_dir():
        files = sorted(root.rglob("*.rttm"))
        if not files:
            raise ValueError(f"no .rttm files in {root}")
    elif root.is_file():
        files = [root]
    else:
        raise ValueError(f"{root} does not exist")
    out: Dict[str, List[Turn]] = {}
    for file in files:
        for uri, turns in turns_by_uri(read_rttm(file)).items():
            out.setdefault(uri, []).extend(turns)
    return out


def to_annotation(turns: Sequence[Turn], uri: str):  # -> pyannote.core.Annotation
    from pyannote.core import Annotation, Segment

    annotation = Annotation(uri=uri)
    for k, turn in enumerate(turns):
        if turn.duration > 0:
            annotation[Segment(turn.start, turn.end), k] = turn.speaker
    return annotation


def _extent(ref, hyp):  # -> pyannote.core.Timeline
    from pyannote.core import Segment, Timeline

    spans = [s for s in list(ref.get_timeline()) + list(hyp.get_timeline())]
    if not spans:
        return Timeline([Segment(0.0, 0.0)])
    return Timeline([Segment(min(s.start for s in spans), max(s.end for s in spans))])


def evaluate(reference: Dict[str, List[Turn]], hypothesis: Dict[str, List[Turn]], collar: float = 0.25,
             skip_overlap: bool = False) -> EvalReport:
    """Score every reference recording (a missing hypothesis counts as no speech found)."""
    from pyannote.metrics.diarization import DiarizationErrorRate, JaccardErrorRate

    if collar < 0:
        raise ValueError(f"collar must be >= 0 seconds, got {collar}")
    der_metric = DiarizationErrorRate(collar=2 * collar, skip_overlap=skip_overlap)
    jer_metric = JaccardErrorRate(collar=2 * collar, skip_overlap=skip_overlap)
    files: List[FileScore] = []
    missing = sorted(set(reference) - set(hypothesis))
    extra = sorted(set(hypothesis) - set(reference))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for uri in sorted(reference):
            ref = to_annotation(reference[uri], uri)
            hyp = to_annotation(hypothesis.get(uri, []), uri)
            uem = _extent(ref, hyp)
            detail = der_metric(ref, hyp, uem=uem, detailed=True)
            jer = jer_metric(ref, hyp, uem=uem)
            files.append(FileScore(
                uri=uri, scored_s=float(detail["total"]), missed_s=float(detail["missed detection"]),
                false_alarm_s=float(detail["false alarm"]), confusion_s=float(detail["confusion"]),
                der=float(detail["diarization error rate"]), jer=float(jer), hyp_found=uri in hypothesis,
            ))
        total_der = float(abs(der_metric)) if files else 0.0
        total_jer = float(abs(jer_metric)) if files else 0.0
    total = FileScore(
        uri="TOTAL", scored_s=sum(f.scored_s for f in files), missed_s=sum(f.missed_s for f in files),
        false_alarm_s=sum(f.false_alarm_s for f in files), confusion_s=sum(f.confusion_s for f in files),
        der=total_der, jer=total_jer,
    )
    return EvalReport(files, total, collar, skip_overlap, missing, extra)


def report_rows(report: EvalReport) -> List[Tuple[str, ...]]:
    """Table rows: uri, scored s, miss %, false alarm %, confusion %, DER %, JER %."""
    rows: List[Tuple[str, ...]] = []
    for f in report.files + [report.total]:
        denom = f.scored_s if f.scored_s > 0 else float("nan")
        rows.append((
            f.uri + ("" if f.hyp_found else " (no hypothesis)"),
            f"{f.scored_s:.2f}",
            f"{100 * f.missed_s / denom:.2f}",
            f"{100 * f.false_alarm_s / denom:.2f}",
            f"{100 * f.confusion_s / denom:.2f}",
            f"{100 * f.der:.2f}",
            f"{100 * f.jer:.2f}",
        ))
    return rows


HEADER: Tuple[str, ...] = ("recording", "scored s", "miss %", "false alarm %", "confusion %", "DER %", "JER %")


def load_and_evaluate(ref: os.PathLike | str, hyp: os.PathLike | str, collar: float = 0.25,
                      skip_overlap: bool = False) -> EvalReport:
    return evaluate(load_rttms(ref), load_rttms(hyp), collar=collar, skip_overlap=skip_overlap)


def describe(report: EvalReport) -> Optional[str]:
    """Warnings about unmatched recordings, or None."""
    lines = []
    if report.missing_hyp:
        lines.append(f"no hypothesis for {len(report.missing_hyp)} recording(s), scored as all missed: "
                     + ", ".join(report.missing_hyp[:10]))
    if report.extra_hyp:
        lines.append(f"{len(report.extra_hyp)} hypothesis recording(s) have no reference and are ignored: "
                     + ", ".join(report.extra_hyp[:10]))
    return "\n".join(lines) or None
