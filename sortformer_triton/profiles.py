"""Speaker profiles: a stream's speaker state saved to a file, and a new stream started from it.

What the sortformer graph reads between steps -- the speaker cache and its predictions, the FIFO, the
silence profile and their lengths -- leaves the server as SAVED_PROFILE / SAVED_PROFILE_HEADER when a
request carries the parameter ``save_profile=true`` (the state *after* that request), and goes back in as
PROFILE / PROFILE_HEADER on the START request of ``diarizer_<preset>_from_profile``: the new stream's state
is the saved one, still held by Triton as implicit state (contract.py has the layout).

The file (``SpeakerProfile.save`` / ``load``) is a numpy ``.npz`` without pickles: the arrays ``profile``
(float32) and ``header`` (int64), and ``meta``, a JSON text with the file format version, the graph
format, the preset, the names of the slots, the fingerprint of the model and preset that saved it, the
encoder width and the sha256 of the arrays. ``load`` refuses a file that is not such a profile, a newer
format, or one whose arrays do not match their checksum or their own sizes; the graph refuses a profile
saved by another model or preset (its fingerprint) with FEATURE_ERROR ``ERR_PROFILE_ORIGIN``.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import contract
from .presets import N_SPEAKERS, Preset, get_preset
from .speakers import EnrollmentError, check_names
from .timeline import bool_parameter

FILE_FORMAT = 1
FILE_KIND = "sortformer-triton speaker profile"
MAX_FILE_BYTES = 64 * 1024 * 1024  # a full-size profile is ~0.8 MB
PathLike = Union[str, "os.PathLike[str]"]


class ProfileError(ValueError):
    """A speaker profile that cannot be used; the message says why."""


def parse_save_profile(values: Mapping[str, object]) -> bool:
    """The ``save_profile`` request parameter of a request's parameters (``timeline.parse_request_parameters``)."""
    return bool_parameter(values, contract.SAVE_PROFILE_PARAMETER)


def emb_dim_of(preset: Preset, size: int) -> Optional[int]:
    """The encoder width D whose profile on ``preset`` has ``size`` floats (contract.profile_size), or None."""
    # profile_size is linear in D: size(D) = size(0) + D * (size(1) - size(0))
    fixed = contract.profile_size(preset, 0)
    per_d = contract.profile_size(preset, 1) - fixed
    rest = size - fixed
    if rest <= 0 or rest % per_d:
        return None
    return rest // per_d


def _digest(profile: np.ndarray, header: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(profile, "<f4").tobytes())
    h.update(np.ascontiguousarray(header, "<i8").tobytes())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class SpeakerProfile:
    """One saved speaker state of a preset's graph, with the slots' names."""

    preset: str
    profile: np.ndarray  # float32 [contract.profile_size(preset, emb_dim)]
    header: np.ndarray  # int64 [contract.PROFILE_HEADER_LEN], as saved (flags = PROFILE_SAVE)
    names: Tuple[str, ...] = ("",) * N_SPEAKERS
    created: str = ""

    def __post_init__(self) -> None:
        self.check()

    # ---- views ------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> int:
        return int(self.header[2])

    @property
    def emb_dim(self) -> int:
        dim = emb_dim_of(get_preset(self.preset), int(self.profile.size))
        assert dim is not None  # check() ensured it
        return dim

    @property
    def lengths(self) -> dict:
        return {name: int(v) for name, v in zip(contract.PROFILE_HEADER_FIELDS[3:], self.header[3:])}

    def restore_header(self) -> np.ndarray:
        """PROFILE_HEADER of a START from this profile (flags = PROFILE_RESTORE)."""
        header = self.header.astype(np.int64).copy()
        header[0] = contract.PROFILE_RESTORE
        return header

    def with_names(self, names: Sequence[str]) -> "SpeakerProfile":
        return dataclasses.replace(self, names=tuple(names))

    # ---- checks -----------------------------------------------------------------------------------
    def check(self) -> None:
        """Everything a file can say about itself: preset, sizes, header fields, values, names."""
        try:
            preset = get_preset(self.preset)
        except ValueError as exc:
            raise ProfileError(f"the profile's preset is unknown: {exc}") from None
        profile, header = np.asarray(self.profile), np.asarray(self.header)
        if profile.dtype != np.float32 or profile.ndim != 1:
            raise ProfileError(f"profile must be float32 [n], got {profile.dtype} {list(profile.shape)}")
        if header.dtype != np.int64 or header.shape != (contract.PROFILE_HEADER_LEN,):
            raise ProfileError(f"header must be int64 [{contract.PROFILE_HEADER_LEN}], got {header.dtype} "
                               f"{list(header.shape)}")
        dim = emb_dim_of(preset, profile.size)
        if dim is None:
            raise ProfileError(f"{profile.size} values are no profile size of preset {preset.name} "
                               f"(contract.profile_size: S*D + 4S + F*D + D)")
        fields = dict(zip(contract.PROFILE_HEADER_FIELDS, (int(v) for v in header)))
        if fields["format"] != contract.PROFILE_FORMAT:
            raise ProfileError(f"graph format {fields['format']} (this version reads {contract.PROFILE_FORMAT})")
        if not (0 <= fields["spkcache_lengths"] <= preset.spkcache_len
                and 0 <= fields["fifo_lengths"] <= preset.fifo_len and fields["n_sil_frames"] >= 0):
            raise ProfileError(f"lengths out of range for preset {preset.name}: {fields}")
        if not np.isfinite(profile).all() or np.abs(profile).max(initial=0.0) > contract.MAX_ABS_PROFILE:
            raise ProfileError("the profile holds values that are not finite or beyond +-1e4")
        cache, preds_shape = contract.profile_shapes(preset, dim)[:2]  # the predictions follow the cache
        start = int(np.prod(cache))
        preds = profile[start: start + int(np.prod(preds_shape))]
        if preds.size and (preds.min() < 0 or preds.max() > 1):
            raise ProfileError("the profile's speaker-cache predictions are outside [0, 1]")
        try:
            check_names(list(self.names))
        except EnrollmentError as exc:
            raise ProfileError(f"the profile's names: {exc}") from None

    def check_for(self, preset: Preset) -> None:
        """Refuse a profile another preset saved (its graph would refuse it too, less clearly)."""
        if preset.name != self.preset:
            raise ProfileError(f"the profile was saved on preset {self.preset!r}; this stream uses "
                               f"{preset.name!r} (a profile restores only into the preset that saved it)")

    # ---- files ------------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {
            "kind": FILE_KIND, "file_format": FILE_FORMAT, "graph_format": contract.PROFILE_FORMAT,
            "preset": self.preset, "names": list(self.names), "fingerprint": f"{self.fingerprint:016x}",
            "emb_dim": self.emb_dim, "lengths": self.lengths, "created": self.created,
            "sha256": _digest(self.profile, self.header),
        }

    def save(self, path: PathLike) -> Path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "wb") as fh:
            np.savez(fh, profile=self.profile, header=self.header,
                     meta=np.frombuffer(json.dumps(self.meta(), sort_keys=True).encode(), np.uint8))
        return out

    @classmethod
    def load(cls, path: PathLike) -> "SpeakerProfile":
        where = os.fspath(path)
        try:
            size = os.path.getsize(where)
            if size > MAX_FILE_BYTES:
                raise ProfileError(f"{where}: {size} bytes is too large for a speaker profile")
            with open(where, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise ProfileError(f"cannot read the speaker profile {where}: {exc}") from None
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise ProfileError(f"{where} is not a speaker profile (.npz): {exc}") from None
        missing = {"profile", "header", "meta"} - set(arrays)
        if missing:
            raise ProfileError(f"{where} is not a speaker profile: it lacks {sorted(missing)}")
        try:
            meta = json.loads(arrays["meta"].astype(np.uint8).tobytes().decode())
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProfileError(f"{where}: its meta is not JSON: {exc}") from None
        if meta.get("kind") != FILE_KIND:
            raise ProfileError(f"{where} is not a speaker profile (kind {meta.get('kind')!r})")
        if meta.get("file_format") != FILE_FORMAT:
            raise ProfileError(f"{where}: file format {meta.get('file_format')!r}; this version reads "
                               f"{FILE_FORMAT}")
        profile, header = arrays["profile"], arrays["header"]
        if profile.dtype != np.float32 or header.dtype != np.int64:
            raise ProfileError(f"{where}: arrays of the wrong types ({profile.dtype}, {header.dtype})")
        if meta.get("sha256") != _digest(profile, header):
            raise ProfileError(f"{where} is corrupt: its arrays do not match their sha256")
        try:
            loaded = cls(preset=str(meta.get("preset")), profile=profile, header=header,
                         names=tuple(meta.get("names") or ("",) * N_SPEAKERS), created=str(meta.get("created", "")))
        except ProfileError as exc:
            raise ProfileError(f"{where}: {exc}") from None
        if meta.get("fingerprint") != f"{loaded.fingerprint:016x}" or meta.get("emb_dim") != loaded.emb_dim:
            raise ProfileError(f"{where}: its meta does not match its arrays (fingerprint / emb_dim)")
        return loaded

    @classmethod
    def from_outputs(cls, preset: Preset, saved: np.ndarray, header: np.ndarray,
                     names: Sequence[str]) -> "SpeakerProfile":
        """The profile of a response's SAVED_PROFILE / SAVED_PROFILE_HEADER (a batch dim of 1 accepted)."""
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return cls(preset=preset.name, profile=np.asarray(saved, np.float32).reshape(-1).copy(),
                   header=np.asarray(header, np.int64).reshape(-1).copy(), names=tuple(names), created=stamp)


def saved_in(header: np.ndarray) -> bool:
    """Whether a response's SAVED_PROFILE_HEADER carries a saved profile."""
    h = np.asarray(header).reshape(-1)
    return h.size == contract.PROFILE_HEADER_LEN and int(h[0]) == contract.PROFILE_SAVE
