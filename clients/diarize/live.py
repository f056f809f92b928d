"""``diarize live``: diarize a microphone (sounddevice) or a wav file played as if it were one.

Audio blocks go to one stream as they arrive; finalized segments are printed as soon as the server
finalizes them, and the current tentative view is shown on one status line. ``--input-wav`` replaces the
microphone with a file, paced in real time by default (``--no-pace``: as fast as the server answers),
which is how the tests drive this mode.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from typing import Callable, Iterator, Optional, Sequence, TextIO, Tuple

import numpy as np

from clients.sortformer_client import DiarizationClient, Result, SpeakerProfile, Update, load_audio, speaker_label

BLOCK_SECONDS = 0.1


def wav_blocks(path: str, block_seconds: float = BLOCK_SECONDS, pace: bool = True,
               seconds: Optional[float] = None) -> Iterator[tuple]:
    """(samples, sample_rate) blocks of a file, as a microphone would deliver them."""
    audio, rate = load_audio(path)
    if seconds is not None:
        audio = audio[: int(seconds * rate)]
    block = max(1, int(round(block_seconds * rate)))
    t0 = time.monotonic()
    for k, start in enumerate(range(0, audio.size, block)):
        if pace:
            delay = t0 + k * block_seconds - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        yield audio[start:start + block], rate


def microphone_blocks(device: Optional[str], sample_rate: int, block_seconds: float = BLOCK_SECONDS,
                      seconds: Optional[float] = None,
                      stop: Optional[threading.Event] = None) -> Iterator[tuple]:
    """(samples, sample_rate) blocks from a sounddevice input until ``seconds`` or Ctrl-C."""
    try:
        import sounddevice
    except (ImportError, OSError) as exc:  # OSError: the PortAudio library is missing
        raise RuntimeError(
            f"microphone input needs the 'sounddevice' package and the PortAudio library "
            f"(pip install sounddevice; apt-get install libportaudio2): {exc}") from None
    blocks: "queue.Queue[np.ndarray]" = queue.Queue()

    def callback(indata: np.ndarray, frames: int, when: object, status: object) -> None:
        blocks.put(indata.copy())

    block = max(1, int(round(block_seconds * sample_rate)))
    device_arg = int(device) if device is not None and device.isdigit() else device
    with sounddevice.InputStream(samplerate=sample_rate, channels=1, dtype="float32", blocksize=block,
                                 device=device_arg, callback=callback):
        t0 = time.monotonic()
        while seconds is None or time.monotonic() - t0 < seconds:
            if stop is not None and stop.is_set():
                break
            try:
                data = blocks.get(timeout=1.0)
            except queue.Empty:
                continue
            yield data[:, 0], sample_rate


def run_live(client: DiarizationClient, blocks: Iterator[tuple], out: TextIO = sys.stdout,
             on_update: Optional[Callable[[Update], None]] = None,
             enroll: Sequence[Tuple[str, np.ndarray, int]] = (), profile: Optional[SpeakerProfile] = None,
             save_profile: bool = False) -> Result:
    """Stream the blocks (after the enrollment clips); print each finalized segment once, when it is
    finalized, with its speaker's name; the final result."""
    def report(update: Update) -> None:
        names = update.speaker_names
        for seg in update.finalized_segments:
            out.write(f"{seg.start:9.2f} {seg.end:9.2f}  {speaker_label(seg.speaker, names)}\n")
        if out.isatty():
            view = " ".join(f"{speaker_label(s.speaker, names)}@{s.start:.1f}-{s.end:.1f}"
                            for s in update.tentative_segments[-3:])
            out.write(f"\r  frames {update.tentative_offset:6d}  tentative: {view[:60]:60s}\r")
        out.flush()
        if on_update is not None:
            on_update(update)

    with client.open_stream(on_update=report, profile=profile) as stream:
        for name, clip, rate in enroll:
            stream.enroll(name, clip, rate)
        if enroll:
            out.write("enrolled: " + ", ".join(f"{n} -> slot {k}" for k, n in enumerate(stream.speaker_names) if n)
                      + " (the last clip is decided with the first responses)\n")
        try:
            for samples, rate in blocks:
                stream.feed(samples, rate)
        except KeyboardInterrupt:
            out.write("\nstopping ...\n")
        return stream.close(save_profile=save_profile)
