// Live diarization page: microphone -> AudioWorklet (mono float32 PCM) -> WebSocket /ws -> gateway ->
// Triton; every update comes back as JSON and is drawn as a per-speaker timeline (finalized segments
// solid, tentative ones hatched) with the latest per-speaker probabilities.
//
// Observable state for tests and debugging: window.diarizationState (counters, segments, result) and
// window.diarizationTimeline.geometry() (where the canvas draws a time and a speaker row).
"use strict";

(() => {
  const N_SPEAKERS = 4;
  const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];
  const WINDOW_SECONDS = 30; // the timeline scrolls once a session is longer
  const MIN_SPAN_SECONDS = 10;
  const BLOCK_SECONDS = 0.1; // PCM per WebSocket frame
  const LAYOUT = { left: 92, right: 14, top: 6, row: 50, bar: 28, strip: 9, gap: 4, axis: 26 };

  const $ = (id) => document.getElementById(id);

  const state = {
    status: "idle", // idle | starting | streaming | stopping | done | error | disconnected
    preset: null, sampleRate: null, sequenceId: null, frameSeconds: 0.08, latencySeconds: null,
    names: new Array(N_SPEAKERS).fill(""), // the slots' names from the server ("" = unnamed)
    updates: 0, framesConfirmed: 0, confirmed: [], tentativeOffset: 0, tentative: [],
    finalized: [], tentativeSegments: [], probabilities: new Array(N_SPEAKERS).fill(0), probabilitiesFrame: null,
    samplesSent: 0, bytesSent: 0, audioSeconds: 0, rms: 0, lastLatencyMs: null,
    errors: [], result: null, drawn: { finalized: 0, tentative: 0, frames: 0 },
  };
  window.diarizationState = state;

  let socket = null;
  let capture = null;
  let stopSent = false;
  let sumSquares = 0;
  let geometry = null;

  // ---- status and controls ------------------------------------------------------------------------
  function setStatus(status, text, isError) {
    state.status = status;
    const el = $("status");
    el.textContent = text;
    el.classList.toggle("error", Boolean(isError));
    $("start").disabled = !["idle", "done", "error", "disconnected"].includes(status) || !$("preset").value;
    $("stop").disabled = !["starting", "streaming"].includes(status);
    $("preset").disabled = $("start").disabled;
  }

  async function loadInfo() {
    try {
      const info = await (await fetch("/api/info")).json();
      const select = $("preset");
      select.innerHTML = "";
      for (const name of info.presets) {
        const option = document.createElement("option");
        option.value = option.textContent = name;
        select.appendChild(option);
      }
      if (info.presets.includes(info.default_preset)) select.value = info.default_preset;
      state.frameSeconds = info.frame_seconds;
      if (info.presets.length) setStatus("idle", "ready: press Start and speak");
      else setStatus("error", `Triton is unavailable: ${info.error || "no preset served"}`, true);
    } catch (err) {
      setStatus("error", `cannot reach the gateway: ${err}`, true);
    }
  }

  // ---- audio capture ----------------------------------------------------------------------------------
  async function openCapture() {
    const media = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    const ctx = new AudioContext();
    await ctx.resume();
    const source = ctx.createMediaStreamSource(media);
    const mute = ctx.createGain();
    mute.gain.value = 0;
    const block = Math.round(ctx.sampleRate * BLOCK_SECONDS);
    let node;
    if (ctx.audioWorklet && window.AudioWorkletNode) {
      await ctx.audioWorklet.addModule("/static/capture-worklet.js");
      node = new AudioWorkletNode(ctx, "pcm-capture", {
        numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1], processorOptions: { blockSize: block },
      });
    } else { // ScriptProcessor fallback (older browsers)
      node = ctx.createScriptProcessor(4096, 1, 1);
    }
    return {
      ctx, media, source, node, mute, kind: node instanceof ScriptProcessorNode ? "scriptprocessor" : "audioworklet",
      connect(onPcm) {
        if (this.kind === "audioworklet") node.port.onmessage = (event) => onPcm(event.data);
        else node.onaudioprocess = (event) => onPcm(new Float32Array(event.inputBuffer.getChannelData(0)));
        source.connect(node);
        node.connect(mute);
        mute.connect(ctx.destination);
      },
      close() {
        try { source.disconnect(); node.disconnect(); } catch (err) { /* already disconnected */ }
        for (const track of media.getTracks()) track.stop();
        return ctx.close();
      },
    };
  }

  function sendPcm(samples) {
    if (!socket || socket.readyState !== WebSocket.OPEN || stopSent) return;
    if (state.status !== "streaming" && state.status !== "stopping") return;
    socket.send(samples.buffer.byteLength === samples.byteLength ? samples.buffer : samples.slice().buffer);
    state.samplesSent += samples.length;
    state.bytesSent += samples.byteLength;
    for (let i = 0; i < samples.length; i++) sumSquares += samples[i] * samples[i];
    state.rms = Math.sqrt(sumSquares / Math.max(1, state.samplesSent));
    state.audioSeconds = state.samplesSent / state.sampleRate;
    renderTimeline(); // moves the "audio sent" marker
    renderStats();
  }

  // ---- session ----------------------------------------------------------------------------------------
  function resetSession() {
    Object.assign(state, {
      sequenceId: null, updates: 0, framesConfirmed: 0, confirmed: [], tentativeOffset: 0, tentative: [],
      finalized: [], tentativeSegments: [], probabilities: new Array(N_SPEAKERS).fill(0),
      probabilitiesFrame: null, samplesSent: 0, bytesSent: 0, audioSeconds: 0, rms: 0, lastLatencyMs: null,
      errors: [], result: null,
    });
    sumSquares = 0;
    stopSent = false;
  }

  async function start() {
    resetSession();
    render();
    setStatus("starting", "opening the microphone…");
    try {
      capture = await openCapture();
    } catch (err) {
      setStatus("error", `microphone unavailable: ${err.message || err}`, true);
      return;
    }
    state.sampleRate = capture.ctx.sampleRate;
    state.preset = $("preset").value;
    setStatus("starting", "connecting…");
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}/ws`);
    socket.binaryType = "arraybuffer";
    socket.onopen = () => {
      socket.send(JSON.stringify({ type: "start", preset: state.preset, sample_rate: state.sampleRate }));
    };
    socket.onmessage = (event) => onMessage(JSON.parse(event.data));
    socket.onclose = () => {
      if (!["done", "error"].includes(state.status)) setStatus("disconnected", "the gateway closed the connection", true);
      closeCapture();
      socket = null;
    };
  }

  function stop() {
    if (capture && capture.kind === "audioworklet") capture.node.port.postMessage("flush");
    setStatus("stopping", "finishing: flushing the last frames…");
    // let the worklet's last block arrive, then end the stream
    setTimeout(() => {
      closeCapture();
      if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "stop" }));
      stopSent = true;
    }, 150);
  }

  function closeCapture() {
    if (capture) {
      const c = capture;
      capture = null;
      c.close();
    }
  }

  function onMessage(msg) {
    if (msg.type === "started") {
      state.sequenceId = msg.sequence_id;
      state.frameSeconds = msg.frame_seconds;
      state.latencySeconds = msg.latency_seconds;
      setNames(msg.speaker_names);
      setStatus("streaming", `streaming at ${state.sampleRate} Hz, preset ${msg.preset} ` +
        `(latency ${msg.latency_seconds.toFixed(2)} s), sequence ${msg.sequence_id}`);
      if (capture) capture.connect(sendPcm);
    } else if (msg.type === "update") {
      setNames(msg.speaker_names);
      onUpdate(msg);
    } else if (msg.type === "result") {
      state.result = {
        n_frames: msg.n_frames, duration_s: msg.duration_s, finished: msg.finished, requests: msg.requests,
        segments: msg.segments, sequence_id: msg.sequence_id,
      };
      state.tentativeSegments = []; // every segment is final now (state.finalized holds them as streamed)
      state.tentative = [];
      setStatus("done", `done: ${msg.duration_s.toFixed(1)} s, ${msg.n_frames} frames, ` +
        `${msg.segments.length} segments, ${msg.requests} requests`);
      render();
      socket.close(1000);
    } else if (msg.type === "error") {
      state.errors.push({ code: msg.code, message: msg.message });
      if (msg.stream_ended || state.status === "starting") {
        setStatus("error", `${msg.code}: ${msg.message}`, true);
        closeCapture();
        if (socket) socket.close(1000);
      }
    }
  }

  function onUpdate(msg) {
    state.updates += 1;
    for (const row of msg.confirmed) state.confirmed.push(row);
    state.framesConfirmed = msg.frames_confirmed;
    state.sequenceId = msg.sequence_id;  // a retried START moves the stream to a new sequence id
    state.tentativeOffset = msg.tentative_offset;
    state.tentative = msg.tentative;
    for (const seg of msg.finalized_segments) state.finalized.push(seg);
    state.tentativeSegments = msg.tentative_segments;
    if (msg.probabilities) {
      state.probabilities = msg.probabilities;
      state.probabilitiesFrame = msg.probabilities_frame;
    }
    state.lastLatencyMs = msg.latency_ms;
    render();
  }

  // ---- drawing ------------------------------------------------------------------------------------------
  const hatchCache = {};
  function hatch(ctx, color) {
    if (!hatchCache[color]) {
      const tile = document.createElement("canvas");
      tile.width = tile.height = 8;
      const t = tile.getContext("2d");
      t.fillStyle = color + "38";
      t.fillRect(0, 0, 8, 8);
      t.strokeStyle = color + "c0";
      t.lineWidth = 2;
      t.beginPath();
      t.moveTo(-2, 10); t.lineTo(10, -2);
      t.moveTo(-2, 2); t.lineTo(2, -2);
      t.moveTo(6, 10); t.lineTo(10, 6);
      t.stroke();
      hatchCache[color] = ctx.createPattern(tile, "repeat");
    }
    return hatchCache[color];
  }

  function niceStep(span, pixels) {
    for (const step of [0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300]) if (pixels * step / span >= 64) return step;
    return 600;
  }

  function timeRange() {
    const fs = state.frameSeconds;
    let end = Math.max(state.audioSeconds, (state.tentativeOffset + state.tentative.length) * fs,
      state.framesConfirmed * fs);
    for (const s of state.finalized) end = Math.max(end, s.end);
    for (const s of state.tentativeSegments) end = Math.max(end, s.end);
    if (state.result) end = Math.max(end, state.result.duration_s);
    if (end <= WINDOW_SECONDS) return [0, Math.min(WINDOW_SECONDS, Math.max(MIN_SPAN_SECONDS, Math.ceil(end + 0.5)))];
    return [end - WINDOW_SECONDS, end];
  }

  function renderTimeline() {
    const canvas = $("timeline");
    const dpr = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = LAYOUT.top + N_SPEAKERS * LAYOUT.row + LAYOUT.axis;
    canvas.style.height = `${height}px`;
    if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
      canvas.width = Math.round(width * dpr);
      canvas.height = Math.round(height * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const plotWidth = Math.max(10, width - LAYOUT.left - LAYOUT.right);
    const [t0, t1] = timeRange();
    const x = (t) => LAYOUT.left + ((t - t0) / (t1 - t0)) * plotWidth;
    const rowTop = (s) => LAYOUT.top + s * LAYOUT.row;
    const barTop = (s) => rowTop(s) + LAYOUT.gap;
    const stripTop = (s) => barTop(s) + LAYOUT.bar + 3;
    const bottom = LAYOUT.top + N_SPEAKERS * LAYOUT.row;
    geometry = {
      dpr, left: LAYOUT.left, plotWidth, t0, t1, rowTop: [...Array(N_SPEAKERS).keys()].map(rowTop),
      barTop: [...Array(N_SPEAKERS).keys()].map(barTop), barHeight: LAYOUT.bar,
      stripTop: [...Array(N_SPEAKERS).keys()].map(stripTop), stripHeight: LAYOUT.strip, colors: COLORS,
    };
    const drawn = { finalized: 0, tentative: 0, frames: 0 };

    // rows and labels
    ctx.font = "13px 'DejaVu Sans', sans-serif";
    ctx.textBaseline = "middle";
    for (let s = 0; s < N_SPEAKERS; s++) {
      ctx.fillStyle = s % 2 ? "#f7f8fa" : "#eff1f4";
      ctx.fillRect(LAYOUT.left, rowTop(s), plotWidth, LAYOUT.row);
      ctx.fillStyle = COLORS[s];
      ctx.fillRect(6, barTop(s) + 8, 12, 12);
      ctx.fillStyle = "#1d2430";
      ctx.fillText(speakerName(s), 22, barTop(s) + 14);
    }
    // time grid
    const step = niceStep(t1 - t0, plotWidth);
    ctx.strokeStyle = "#d9dde3";
    ctx.fillStyle = "#6b7380";
    ctx.lineWidth = 1;
    ctx.textAlign = "center";
    for (let t = Math.ceil(t0 / step) * step; t <= t1 + 1e-9; t += step) {
      ctx.beginPath();
      ctx.moveTo(Math.round(x(t)) + 0.5, LAYOUT.top);
      ctx.lineTo(Math.round(x(t)) + 0.5, bottom + 4);
      ctx.stroke();
      ctx.fillText(`${Number(t.toFixed(1))} s`, x(t), bottom + 14);
    }
    ctx.textAlign = "left";

    ctx.save();
    ctx.beginPath();
    ctx.rect(LAYOUT.left, 0, plotWidth, height);
    ctx.clip();
    // per-frame probabilities: a strip under each row (confirmed solid, tentative lighter)
    const fs = state.frameSeconds;
    const frameWidth = Math.max(1, (fs / (t1 - t0)) * plotWidth + 0.5);
    const firstFrame = Math.max(0, Math.floor(t0 / fs));
    const strip = (frame, probs, weight) => {
      for (let s = 0; s < N_SPEAKERS; s++) {
        ctx.globalAlpha = Math.max(0, Math.min(1, probs[s])) * weight;
        ctx.fillStyle = COLORS[s];
        ctx.fillRect(x(frame * fs), stripTop(s), frameWidth, LAYOUT.strip);
      }
      drawn.frames += 1;
    };
    for (let f = firstFrame; f < state.confirmed.length; f++) strip(f, state.confirmed[f], 1);
    state.tentative.forEach((probs, k) => strip(state.tentativeOffset + k, probs, 0.45));
    ctx.globalAlpha = 1;

    // segments
    for (const seg of state.finalized) {
      if (seg.end < t0 || seg.start > t1) continue;
      ctx.fillStyle = COLORS[seg.speaker];
      ctx.fillRect(x(seg.start), barTop(seg.speaker), Math.max(1, x(seg.end) - x(seg.start)), LAYOUT.bar);
      drawn.finalized += 1;
    }
    ctx.setLineDash([4, 3]);
    for (const seg of state.tentativeSegments) {
      if (seg.end < t0 || seg.start > t1) continue;
      const w = Math.max(1, x(seg.end) - x(seg.start));
      ctx.fillStyle = hatch(ctx, COLORS[seg.speaker]);
      ctx.fillRect(x(seg.start), barTop(seg.speaker), w, LAYOUT.bar);
      ctx.strokeStyle = COLORS[seg.speaker];
      ctx.strokeRect(x(seg.start) + 0.5, barTop(seg.speaker) + 0.5, w - 1, LAYOUT.bar - 1);
      drawn.tentative += 1;
    }
    // confirmed boundary and audio position
    ctx.setLineDash([]);
    ctx.strokeStyle = "#1d2430";
    ctx.lineWidth = 2;
    const confirmedAt = x(state.framesConfirmed * fs);
    ctx.beginPath(); ctx.moveTo(confirmedAt, LAYOUT.top); ctx.lineTo(confirmedAt, bottom); ctx.stroke();
    if (!state.result && state.audioSeconds > 0) {
      ctx.setLineDash([5, 4]);
      ctx.strokeStyle = "#6b7380";
      const nowAt = x(state.audioSeconds);
      ctx.beginPath(); ctx.moveTo(nowAt, LAYOUT.top); ctx.lineTo(nowAt, bottom); ctx.stroke();
      ctx.setLineDash([]);
    }
    ctx.restore();
    state.drawn = drawn;
  }

  // slot names from the server ("" = unnamed: speaker_<k>); the page shows them everywhere
  function speakerName(s) {
    return (state.names && state.names[s]) || `speaker_${s}`;
  }

  function setNames(names) {
    if (!Array.isArray(names)) return;
    state.names = names.slice();
    for (let s = 0; s < N_SPEAKERS; s++) {
      const el = $(`prob-name-${s}`);
      if (el) el.textContent = speakerName(s);
    }
  }

  function buildProbabilityBars() {
    const box = $("probs");
    for (let s = 0; s < N_SPEAKERS; s++) {
      const row = document.createElement("div");
      row.className = "prob";
      row.innerHTML = `<span class="name" id="prob-name-${s}" style="color:${COLORS[s]}">speaker_${s}</span>` +
        `<div class="bar"><div class="fill" id="prob-fill-${s}" style="background:${COLORS[s]}"></div></div>` +
        `<span class="value" id="prob-value-${s}">0.00</span>`;
      box.appendChild(row);
    }
  }

  function renderProbabilities() {
    state.probabilities.forEach((p, s) => {
      $(`prob-fill-${s}`).style.width = `${(100 * p).toFixed(1)}%`;
      $(`prob-value-${s}`).textContent = p.toFixed(2);
      $(`prob-fill-${s}`).parentElement.parentElement.classList.toggle("active", p >= 0.5);
    });
    const frame = state.probabilitiesFrame;
    $("prob-frame").textContent = frame === null ? "" : `(frame ${frame}, ${(frame * state.frameSeconds).toFixed(2)} s)`;
  }

  function renderSegments() {
    const list = $("segments");
    list.innerHTML = "";
    const latest = state.finalized.slice().sort((a, b) => a.start - b.start).slice(-10);
    for (const seg of latest) {
      const item = document.createElement("li");
      item.innerHTML = `<b style="color:${COLORS[seg.speaker]}">${seg.label}</b> ` +
        `${seg.start.toFixed(2)}&ndash;${seg.end.toFixed(2)} s`;
      list.appendChild(item);
    }
  }

  function renderStats() {
    $("stat-audio").textContent = `${state.audioSeconds.toFixed(1)} s`;
    $("stat-updates").textContent = String(state.updates);
    $("stat-frames").textContent = String(state.framesConfirmed);
    $("stat-final").textContent = String(state.finalized.length);
    $("stat-tentative").textContent = String(state.tentativeSegments.length);
    $("stat-latency").textContent = state.lastLatencyMs === null ? "–" : `${state.lastLatencyMs.toFixed(0)} ms`;
  }

  function render() {
    renderTimeline();
    renderProbabilities();
    renderSegments();
    renderStats();
  }

  window.diarizationTimeline = { geometry: () => geometry, colors: COLORS, render };

  buildProbabilityBars();
  $("start").addEventListener("click", start);
  $("stop").addEventListener("click", stop);
  window.addEventListener("resize", render);
  setStatus("idle", "loading…");
  render();
  loadInfo();
})();
