"""Named speakers: enrollment clips, slot names on every output, and speaker profiles (docs/speakers.md).

Unit tests of the rules (``sortformer_triton.speakers``, ``sortformer_triton.profiles``) with synthetic
predictions and files, then the proofs against the real local tritonserver serving the tiny model:

* an enrolled stream equals NeMo's streaming loop (deterministic top-k) on the enrollment clips (zero-padded
  to whole steps) and the meeting concatenated, with the visible frames shifted by the clips' frames; the
  slot names are the rule applied to NeMo's predictions of each clip, on RTTM, JSON and every update, and
  hold through the speaker-cache compressions of the meeting;
* a stream started from the saved profile equals NeMo's loop whose streaming state starts as the profile
  (``export.reference.nemo_stream(profile=...)``), and differs from a fresh stream;
* profiles of another model, another preset, or corrupt files, and bad names are clear errors that leave
  the other streams untouched.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest

from clients.sortformer_client import DiarizationClient, ProfileError, SpeakerProfile, StreamError, rttm_lines
from tests.test_gateway import browser  # noqa: F401 (a fixture: headless Chromium with a fake microphone)
from sortformer_triton import contract
from sortformer_triton.presets import N_SPEAKERS, get_preset
from sortformer_triton.samples import conversation, espeak_conversation
from sortformer_triton.timeline import parse_request_parameters
from sortformer_triton.speakers import (
    MIN_ENROLL_SPEECH_FRAMES,
    EnrollmentError,
    SpeakerNames,
    check_name,
    decide_slot,
    parse_stream_names,
    speech_frames,
)

LOW = get_preset("low")
NEMO_ATOL = 1e-4  # tests/test_e2e.py: the server against NeMo on the same seeded weights


# ---- the rules ------------------------------------------------------------------------------------------
def test_the_slot_with_clearly_most_speech_takes_a_clip() -> None:
    assert decide_slot([40, 3, 0, 20]) == (0, "")
    assert decide_slot([3, 0, 25, 12])[0] == 2  # 25 >= 2 x 12
    slot, why = decide_slot([30, 0, 20, 0])  # 30 < 2 x 20: two voices in one clip
    assert slot is None and "slot 0 has 30 speech frames, slot 2 20" in why
    slot, why = decide_slot([MIN_ENROLL_SPEECH_FRAMES - 1, 0, 0, 0])
    assert slot is None and "at least 10 frames = 0.8 s" in why
    assert speech_frames(np.array([[0.9, 0.5, 0.1, 0.6], [0.7, 0.51, 0.0, 0.0]])).tolist() == [2, 1, 0, 1]


def _probs(frames: int, slot: int) -> np.ndarray:
    p = np.full((frames, N_SPEAKERS), 0.02, np.float32)
    p[:, slot] = 0.97
    return p


def test_clip_frames_are_taken_out_and_the_meeting_starts_at_frame_0() -> None:
    names = SpeakerNames(chunk_len=6)
    for _ in range(3):  # a clip of three steps: stream frames 0..18
        names.request("Alice")
    names.request("Bob")  # frames 18..24
    names.request("Bob")  # frames 24..30
    assert [(c.name, c.start, c.end) for c in names.clips] == [("Alice", 0, 18), ("Bob", 18, 30)]
    # the Alice clip's frames confirmed over two responses; tentative frames of the Bob clip are not shown
    visible, done = names.step(_probs(12, 1), _probs(5, 1), 0, finished=False)
    assert done == [] and visible.confirmed.shape == (0, 4) and visible.tentative.shape == (0, 4)
    visible, done = names.step(_probs(6, 1), _probs(5, 3), 12, finished=False)
    assert [(d.name, d.slot) for d in done] == [("Alice", 1)] and names.names == ["", "Alice", "", ""]
    names.request(None)  # the meeting: frames 30.. are meeting frames 0..
    # Bob's clip completes inside a response that also carries the meeting's first frames
    conf = np.concatenate([_probs(12, 3), _probs(4, 0)])
    visible, done = names.step(conf, _probs(2, 0), 18, finished=False)
    assert [(d.name, d.slot) for d in done] == [("Bob", 3)]
    assert visible.frame_offset == 0 and len(visible.confirmed) == 4 and len(visible.tentative) == 2
    visible, _ = names.step(_probs(6, 0), _probs(0, 0), 34, finished=False)
    assert visible.frame_offset == 4 and names.names == ["", "Alice", "", "Bob"]


@pytest.mark.parametrize("case", ["taken_by_a_named_slot", "name_on_another_slot", "unclear", "after_meeting",
                                  "audio_ended_in_clip"])
def test_enrollment_refusals_refuse_the_stream(case: str) -> None:
    names = SpeakerNames(chunk_len=30, names=["Carol", "", "", ""] if case != "name_on_another_slot"
                         else ["", "", "Alice", ""])
    names.request("Alice")
    if case == "after_meeting":
        names.request(None)
        with pytest.raises(EnrollmentError, match="after the meeting audio began"):
            names.request("Bob")
    else:
        probs = {"unclear": np.concatenate([_probs(15, 0), _probs(15, 1)])}.get(case, _probs(30, 0))
        if case == "audio_ended_in_clip":
            with pytest.raises(EnrollmentError, match="the audio ended inside enrollment clip 'Alice'"):
                names.step(probs[:4], probs[:0], 0, finished=True)
        else:
            match = {"taken_by_a_named_slot": "already named 'Carol'", "name_on_another_slot": "is on slot 2",
                     "unclear": "no slot clearly took it"}[case]
            with pytest.raises(EnrollmentError, match=match):
                names.step(probs, probs[:0], 0, finished=False)
    with pytest.raises(EnrollmentError, match="refused at enrollment"):
        names.request(None)


def test_overwrite_renames_a_slot_and_moves_a_name() -> None:
    names = SpeakerNames(chunk_len=10, names=["Carol", "", "Alice", ""])
    names.request("Alice", overwrite=True)
    names.step(_probs(10, 0), _probs(0, 0), 0, finished=False)
    assert names.names == ["Alice", "", "", ""]


def test_names() -> None:
    assert check_name("Dr.Émilie_2") == "Dr.Émilie_2"
    for bad in ("", "Alice Smith", "tab\there", "x" * 65, 7, "nul\x00"):
        with pytest.raises(EnrollmentError):
            check_name(bad)
    text = json.dumps({"speaker_names": json.dumps(["A", "", "B", ""])})  # what request.parameters() returns
    assert parse_stream_names(parse_request_parameters(text)) == ["A", "", "B", ""]
    for bad in (["A", "A", "", ""], ["A"], "A,B"):
        with pytest.raises(EnrollmentError):
            parse_stream_names(parse_request_parameters(json.dumps({"speaker_names": bad})))


# ---- profile files --------------------------------------------------------------------------------------
def _profile(preset=LOW, emb_dim: int = 8, names=("Alice", "", "", "")) -> SpeakerProfile:
    rng = np.random.default_rng(0)
    n = contract.profile_size(preset, emb_dim)
    values = rng.standard_normal(n).astype(np.float32)
    s = preset.spkcache_len
    values[s * emb_dim: s * (emb_dim + N_SPEAKERS)] = rng.random(s * N_SPEAKERS)  # predictions in [0, 1]
    header = np.array([contract.PROFILE_SAVE, contract.PROFILE_FORMAT, 12345, s, 3, 7], np.int64)
    return SpeakerProfile(preset.name, values, header, tuple(names))


def test_profile_files_round_trip(tmp_path: Path) -> None:
    profile = _profile()
    loaded = SpeakerProfile.load(profile.save(tmp_path / "team.profile.npz"))
    assert loaded.preset == "low" and loaded.names == ("Alice", "", "", "") and loaded.emb_dim == 8
    np.testing.assert_array_equal(loaded.profile, profile.profile)
    assert loaded.restore_header().tolist() == [contract.PROFILE_RESTORE] + profile.header.tolist()[1:]
    with pytest.raises(ProfileError, match="saved on preset 'low'; this stream uses 'high'"):
        loaded.check_for(get_preset("high"))


def _rewrite(path: Path, **arrays) -> None:
    with np.load(path) as npz:
        data = {k: npz[k] for k in npz.files}
    data.update(arrays)
    with open(path, "wb") as fh:
        np.savez(fh, **data)


@pytest.mark.parametrize("damage, message", [
    ("flip", "do not match their sha256"),
    ("truncate", "is not a speaker profile"),
    ("text", "is not a speaker profile"),
    ("meta", "kind"),
    ("lengths", "lengths out of range"),
    ("preds", "outside \\[0, 1\\]"),
])
def test_corrupt_profile_files_are_refused(tmp_path: Path, damage: str, message: str) -> None:
    path = _profile().save(tmp_path / "p.npz")
    if damage == "flip":
        with np.load(path) as npz:
            values = npz["profile"].copy()
        values[5] += 1.0
        _rewrite(path, profile=values)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "text":
        path.write_text("SPEAKER x 1 0.0 1.0 <NA> <NA> a <NA> <NA>\n")
    elif damage == "meta":
        _rewrite(path, meta=np.frombuffer(b'{"kind": "something else"}', np.uint8))
    else:  # consistent checksums, impossible contents: what a hand-edited file could hold
        profile = _profile()
        if damage == "lengths":
            header = profile.header.copy()
            header[3] = LOW.spkcache_len + 1
            bad = dict(profile=profile.profile, header=header)
        else:
            values = profile.profile.copy()
            values[LOW.spkcache_len * 8] = 1.5
            bad = dict(profile=values, header=profile.header)
        from sortformer_triton import profiles

        meta = dict(profile.meta(), sha256=profiles._digest(bad["profile"], bad["header"]))
        _rewrite(path, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **bad)
    with pytest.raises(ProfileError, match=message):
        SpeakerProfile.load(path)


# ---- against the server ---------------------------------------------------------------------------------
def _clip(voice: int, seed: int, seconds: float = 5.0, espeak: bool = False) -> np.ndarray:
    make = espeak_conversation if espeak else conversation
    return make(seconds, n_speakers=1, seed=seed, voices=[voice])[0]


def _padded(clips: List[np.ndarray], preset=LOW) -> List[np.ndarray]:
    return [np.concatenate([c, np.zeros(-len(c) % preset.step_samples, np.float32)]) for c in clips]


def _expected_names(ref_preds: np.ndarray, clips: List[Tuple[str, np.ndarray]], preset=LOW) -> List[str]:
    """The naming rule applied to NeMo's predictions of each clip's frames."""
    names, start = [""] * N_SPEAKERS, 0
    for name, clip in clips:
        frames = len(clip) // preset.step_samples * preset.chunk_len
        slot, why = decide_slot(speech_frames(ref_preds[start:start + frames]))
        assert slot is not None, f"the test's clip {name} is not clear for the tiny model: {why}"
        names[slot] = name
        start += frames
    return names


@pytest.fixture(scope="module")
def enrolled(tiny_server, tiny_reference_model, tmp_path_factory):
    """Alice and Bob enrolled (synthetic voices 0 and 1), then a 30 s meeting of both, profile saved at END."""
    from export.reference import nemo_stream

    clips = [("Alice", _clip(0, 10)), ("Bob", _clip(1, 11))]
    meeting, _ = conversation(30.0, n_speakers=2, seed=3)
    updates = []
    with DiarizationClient(tiny_server.grpc_url, protocol="grpc", preset=LOW) as client:
        with client.open_stream(on_update=updates.append) as stream:
            for name, clip in clips:
                stream.enroll(name, clip)
            stream.feed(meeting)
            result = stream.close(save_profile=True)
    padded = _padded([c for _, c in clips])
    ref = nemo_stream(tiny_reference_model, LOW, np.concatenate(padded + [meeting]))
    shift = sum(len(c) for c in padded) // LOW.step_samples * LOW.chunk_len
    expected = _expected_names(ref.preds, list(zip(["Alice", "Bob"], padded)))
    return dict(result=result, updates=updates, ref=ref, shift=shift, names=expected, meeting=meeting,
                path=result.profile.save(tmp_path_factory.mktemp("profiles") / "team.profile.npz"))


@pytest.mark.triton
def test_enrolled_stream_equals_nemo_on_clips_then_meeting(enrolled) -> None:
    result, ref, shift = enrolled["result"], enrolled["ref"], enrolled["shift"]
    assert result.finished and result.n_samples == len(enrolled["meeting"])
    np.testing.assert_allclose(result.probs, ref.preds[shift:], rtol=0, atol=NEMO_ATOL)
    assert ref.compressions >= 1  # the meeting compresses the speaker cache: the names hold through it
    assert list(result.speaker_names) == enrolled["names"] and set(enrolled["names"]) == {"Alice", "Bob", ""}
    # every update after the clips were decided carries the names; frames count from the meeting's start
    seen = [list(u.speaker_names) for u in enrolled["updates"]]
    first = seen.index(enrolled["names"])  # both clips decided (Bob's with the meeting's first responses)
    clip_requests = enrolled["shift"] // LOW.chunk_len  # decided ceil(R / C) = 2 requests after the clips
    assert first == clip_requests + 1 and all(n == enrolled["names"] for n in seen[first:])
    assert enrolled["updates"][0].n_confirmed == 0 and min(s.start for s in result.segments) >= 0
    lines = rttm_lines("meeting", result.segments, result.speaker_names)
    labels = {line.split()[7] for line in lines}
    assert labels & {"Alice", "Bob"} and labels <= {"Alice", "Bob", "speaker_2", "speaker_3"}
    assert {s["label"] for s in result.to_dict()["segments"]} == labels


@pytest.mark.triton
def test_a_stream_from_the_saved_profile_equals_nemo_continued_from_it(enrolled, tiny_server,
                                                                       tiny_reference_model) -> None:
    from export.reference import nemo_stream

    profile = SpeakerProfile.load(enrolled["path"])
    assert profile.names == tuple(enrolled["names"]) and profile.lengths["spkcache_lengths"] == LOW.spkcache_len
    second, _ = conversation(20.0, n_speakers=2, seed=4)
    with DiarizationClient(tiny_server.http_url, protocol="http", preset=LOW) as client:
        result = client.diarize(second, profile=profile)
        fresh = client.diarize(second)
    continued = nemo_stream(tiny_reference_model, LOW, second, profile=(profile.profile, profile.header))
    np.testing.assert_allclose(result.probs, continued.preds, rtol=0, atol=NEMO_ATOL)
    assert np.abs(fresh.probs - continued.preds).max() > 0.05  # the profile is what made the difference
    assert list(result.speaker_names) == enrolled["names"]


@pytest.mark.triton
def test_bad_profiles_are_clear_errors_and_other_streams_go_on(enrolled, tiny_server) -> None:
    profile = SpeakerProfile.load(enrolled["path"])
    header = profile.header.copy()
    header[2] ^= 1  # as if another model (or preset) had saved it: only the server can tell
    foreign = dataclasses.replace(profile, header=header)
    audio, _ = conversation(8.0, n_speakers=2, seed=5)
    with DiarizationClient(tiny_server.grpc_url, protocol="grpc", preset=LOW) as client:
        alone = client.diarize(audio)
        with client.open_stream() as other:
            other.feed(audio[: len(audio) // 2])
            with pytest.raises(StreamError, match="saved by another model or preset"):
                client.diarize(audio, profile=foreign)
            other.feed(audio[len(audio) // 2:])
            untouched = other.close()
    np.testing.assert_array_equal(untouched.probs, alone.probs)
    with DiarizationClient(tiny_server.grpc_url, protocol="grpc", preset="high") as client:
        with pytest.raises(ProfileError, match="saved on preset 'low'"):
            client.open_stream(profile=profile)


@pytest.mark.triton
def test_bad_names_and_late_clips_are_clear_errors(tiny_server) -> None:
    from tests.rawseq import RawSequence

    step = np.zeros(LOW.step_samples, np.float32)
    raw = RawSequence(tiny_server.grpc_url, LOW, sequence_id=881)
    reply = raw.send(step, LOW.step_samples, start=True, parameters={"speaker_names": '["A", "A", "", ""]'})
    assert "INVALID_ARG" in reply.status and "names a speaker twice" in reply.error
    assert raw.send(step, LOW.step_samples, start=True).error == ""
    reply = raw.send(step, LOW.step_samples, parameters={"enroll": "Alice Smith"})
    assert "whitespace" in reply.error and "the stream may go on" in reply.error
    reply = raw.send(step, LOW.step_samples, parameters={"enroll": "Alice"})  # after meeting audio
    assert "after the meeting audio began" in reply.error
    reply = raw.send(step, 0, end=True)
    assert "refused at enrollment" in reply.error
    with DiarizationClient(tiny_server.grpc_url, protocol="grpc", preset=LOW) as client:
        with client.open_stream() as stream:
            with pytest.raises(EnrollmentError):
                stream.enroll("Alice Smith", _clip(0, 1))
            stream.feed(step)
            with pytest.raises(ValueError, match="before the meeting audio"):
                stream.enroll("Alice", _clip(0, 1))


@pytest.mark.triton
def test_an_espeak_voice_keeps_its_name_through_a_long_meeting(tiny_server, tiny_reference_model) -> None:
    """espeak-ng speech: one enrolled voice, a 45 s meeting of three voices that compresses the cache."""
    from export.reference import nemo_stream

    clip = _clip(2, 21, seconds=8.0, espeak=True)
    meeting, _ = espeak_conversation(45.0, n_speakers=3, seed=22)
    names_seen = []
    with DiarizationClient(tiny_server.grpc_url, protocol="grpc-stream", preset=LOW) as client:
        with client.open_stream(on_update=lambda u: names_seen.append(u.speaker_names)) as stream:
            stream.enroll("Dana", clip)
            stream.feed(meeting)
            result = stream.close()
    padded = _padded([clip])
    ref = nemo_stream(tiny_reference_model, LOW, np.concatenate(padded + [meeting]))
    shift = len(padded[0]) // LOW.step_samples * LOW.chunk_len
    np.testing.assert_allclose(result.probs, ref.preds[shift:], rtol=0, atol=NEMO_ATOL)
    assert ref.compressions >= 2
    expected = _expected_names(ref.preds, [("Dana", padded[0])])
    assert list(result.speaker_names) == expected
    first = next(i for i, n in enumerate(names_seen) if any(n))
    assert all(list(n) == expected for n in names_seen[first:])  # from its decision to END


@pytest.mark.triton
def test_readme_flow_enroll_two_voices_save_a_profile_and_start_a_second_meeting(tiny_server, tmp_path) -> None:
    """The README's named-speakers commands: enroll Alice and Bob, RTTM/JSON/PNG with their names and a saved
    profile; a second meeting from that profile carries the names without enrolling again."""
    from sortformer_triton.samples import main as samples_main
    from tests.test_cli import diarize

    voices, out = tmp_path / "voices", tmp_path / "results"
    assert samples_main([str(voices), "--voices", "synthetic"]) == 0
    proc = diarize(str(voices / "meeting.wav"), "--url", tiny_server.grpc_url, "--preset", "low", "--out", str(out),
                   "--enroll", f"Alice={voices / 'alice.wav'}", "--enroll", f"Bob={voices / 'bob.wav'}",
                   "--save-profile", "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    labels = {line.split()[7] for line in (out / "meeting.rttm").read_text().splitlines()}
    data = json.loads((out / "meeting.json").read_text())
    assert sorted(n for n in data["speaker_names"] if n) == ["Alice", "Bob"] and {"Alice", "Bob"} & labels
    assert (out / "meeting.png").stat().st_size > 0 and "Alice" in proc.stdout  # the summary names them
    profile = SpeakerProfile.load(out / "meeting.profile.npz")
    assert sorted(n for n in profile.names if n) == ["Alice", "Bob"]
    proc = diarize(str(voices / "meeting2.wav"), "--url", tiny_server.grpc_url, "--preset", "low", "--out", str(out),
                   "--profile", str(out / "meeting.profile.npz"), "--no-progress", "--no-png")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((out / "meeting2.json").read_text())["speaker_names"] == list(profile.names)
    proc = diarize(str(voices / "meeting2.wav"), "--url", tiny_server.grpc_url, "--preset", "high",
                   "--profile", str(out / "meeting.profile.npz"), "--out", str(out))
    assert proc.returncode == 2 and "saved on preset 'low'" in proc.stdout + proc.stderr


@pytest.mark.triton
def test_the_gateway_page_gets_the_enrolled_names(tiny_server, tmp_path) -> None:
    """clients.gateway --enroll: every WebSocket stream plays the clips first; its updates and result carry the
    names and name-labelled segments, and equal the client library's enrolled stream."""
    import soundfile as sf

    from tests.test_gateway import GatewayProcess, stream_over_websocket

    clips = [("Alice", _clip(0, 10)), ("Bob", _clip(1, 11))]
    for name, clip in clips:
        sf.write(str(tmp_path / f"{name}.wav"), clip, 16000, subtype="FLOAT")
    meeting, _ = conversation(12.0, n_speakers=2, seed=6)
    process = GatewayProcess(tiny_server.grpc_url, tmp_path / "gateway.log",
                             *[f"--enroll={n}={tmp_path / f'{n}.wav'}" for n, _ in clips])
    try:
        received = stream_over_websocket(process.ws_url, meeting, 16000, 4000)
    finally:
        process.stop()
    with DiarizationClient(tiny_server.grpc_url, protocol="grpc", preset=LOW) as client:
        direct = client.diarize(meeting, enroll=[(n, c, 16000) for n, c in clips])
    result = received[-1]
    assert result["type"] == "result" and received[0]["speaker_names"] is not None
    assert result["speaker_names"] == list(direct.speaker_names) and "Alice" in result["speaker_names"]
    assert np.array_equal(np.asarray(result["probabilities"], np.float32), direct.probs)
    assert [s["label"] for s in result["segments"]] == [
        direct.label(s.speaker) for s in sorted(direct.segments, key=lambda s: (s.start, s.end, s.speaker))]
    # Bob's clip is decided with the second meeting response (ceil(R / C) = 2 requests after the clips)
    assert all(u["speaker_names"] == result["speaker_names"] for u in received[2:-1])


@pytest.mark.triton
def test_the_page_shows_the_names(tiny_server, browser, tmp_path) -> None:  # noqa: F811 (the browser fixture)
    """The live page in headless Chromium labels the enrolled slots (probability bars, timeline rows, segments)."""
    import soundfile as sf

    from tests.test_gateway import GatewayProcess, _page_state, _wait

    clips = [("Alice", _clip(0, 10)), ("Bob", _clip(1, 11))]
    for name, clip in clips:
        sf.write(str(tmp_path / f"{name}.wav"), clip, 16000, subtype="FLOAT")
    process = GatewayProcess(tiny_server.grpc_url, tmp_path / "gateway.log",
                             *[f"--enroll={n}={tmp_path / f'{n}.wav'}" for n, _ in clips])
    try:
        browser.get(process.url + "/")
        _wait(browser, "!document.getElementById('start').disabled", 20)
        browser.execute_script("document.getElementById('preset').value = 'low';")
        browser.find_element("id", "start").click()
        _wait(browser, "(window.diarizationState.names || []).filter(Boolean).length > 0", 40)
        names = _page_state(browser)["names"]
        bars = [browser.find_element("id", f"prob-name-{k}").text for k in range(N_SPEAKERS)]
        assert bars == [n or f"speaker_{k}" for k, n in enumerate(names)] and set(names) - {""} <= {"Alice", "Bob"}
        _wait(browser, "window.diarizationState.finalized.length >= 2", 40)
        browser.find_element("id", "stop").click()
        _wait(browser, "window.diarizationState.status === 'done'", 30)
        state = _page_state(browser)
        labels = {s["label"] for s in state["result"]["segments"]}
        assert labels <= {n or f"speaker_{k}" for k, n in enumerate(state["names"])}
        assert all(s["label"] == (state["names"][s["speaker"]] or f"speaker_{s['speaker']}") for s in state["finalized"])
        listed = browser.find_element("id", "segments").text  # the latest finalized segments, by label
        assert all(s["label"] in listed for s in sorted(state["finalized"], key=lambda s: s["start"])[-3:])
    finally:
        process.stop()
