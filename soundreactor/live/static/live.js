// The live page: a camera, a shared screen or a video file in, the model's audio out, frame by frame.
// Wire protocol v1: after a hello, JPEG frames (scaled here to the session's frame size) with a little-endian
// uint32 sequence number go up a WebSocket; each comes back as the same number, the server's step time and one
// 1600-sample interleaved stereo float32 chunk, played by worklet.js. Text messages carry errors and warnings.
"use strict";

const PROTOCOL = 1;
const MAX_IN_FLIGHT = 6; // frames sent and not yet answered (200 ms at 30 fps); beyond it the page drops frames
const MAX_BUFFERED_BYTES = 1 << 20; // socket send backlog beyond which frames are dropped
const JPEG_QUALITY = 0.85;
const KEEP = 1800; // latency samples kept for the percentiles (a minute at 30 fps)
const HISTORY = 8000; // (time, latency) points kept for history()
const SEQS = 20000; // received sequence numbers kept for seqs()

const $ = (id) => document.getElementById(id);

// One running session: source, socket, audio graph, frame timer. `stats` outlives it for the read-out.
let session = null;
let config = null;
let stats = freshStats();

function freshStats() {
  return {
    framesSent: 0,
    chunksReceived: 0,
    underruns: 0,
    droppedFrames: 0, // frames never answered: dropped here (server behind, socket backlog) or by the server
    serverDropped: 0, // of droppedFrames, those the server dropped (a "dropped" message)
    trimmedMs: 0, // audio the worklet dropped to keep latency down
    outOfOrder: 0,
    latencies: [],
    roundTrips: [],
    encodes: [],
    steps: [],
    history: [],
    seqs: [],
    startedAt: performance.now(),
    bufferedMs: 0,
    cushionMs: 0,
    stream: null,
    slot: null,
  };
}

function pushBounded(list, value, bound) {
  list.push(value);
  if (list.length > bound) list.splice(0, list.length - bound);
}

function percentile(values, q) {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

// ---------------------------------------------------------------- messages on the page

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

let warningUntil = 0;
function showWarning(text, seconds = 3) {
  $("warning").textContent = text;
  $("warning").hidden = false;
  warningUntil = performance.now() + seconds * 1000;
}

function setStatus(text) {
  $("status").textContent = text;
}

function mediaErrorText(err, source) {
  const what = { camera: "camera", screen: "screen capture", file: "video file" }[source];
  switch (err && err.name) {
    case "NotAllowedError":
      return source === "camera"
        ? "Camera permission was denied: allow camera access for this site in the browser's settings, then press Start again."
        : "Screen sharing was cancelled or denied: press Start and pick a screen, window or tab to share.";
    case "NotFoundError":
    case "OverconstrainedError":
      return `No ${what} found: connect a camera, or choose "Screen or tab" or "Video file".`;
    case "NotReadableError":
    case "AbortError":
      return `The ${what} could not be opened: it may be in use by another application.`;
    default:
      return `Could not open the ${what}: ${(err && err.message) || err}`;
  }
}

// ---------------------------------------------------------------- sources

async function openSource(source, video) {
  if (source === "file") {
    const file = $("file").files[0];
    if (!file) throw new Error('choose a video file first (the "Video file" source opens a file picker)');
    video.srcObject = null;
    video.src = URL.createObjectURL(file);
    video.loop = true;
    await video.play();
    return () => {
      video.pause();
      URL.revokeObjectURL(video.src);
      video.removeAttribute("src");
      video.load();
    };
  }
  const devices = navigator.mediaDevices;
  if (!devices || !window.isSecureContext) {
    throw new Error(
      "The browser hides the camera and screen on this page because it is not a secure context: open it as " +
        "http://localhost or http://127.0.0.1 on this machine, or start `soundreactor live` with " +
        "--certfile/--keyfile and open the https:// address.",
    );
  }
  let stream;
  if (source === "screen") {
    if (!devices.getDisplayMedia) throw new Error("This browser cannot share a screen (no getDisplayMedia).");
    stream = await devices.getDisplayMedia({ video: { frameRate: 30 }, audio: false });
  } else {
    stream = await devices.getUserMedia({ video: { frameRate: 30, width: 640, height: 360 }, audio: false });
  }
  video.srcObject = stream;
  await video.play();
  return () => {
    for (const track of stream.getTracks()) track.stop();
    video.srcObject = null;
  };
}

// ---------------------------------------------------------------- audio

async function openAudio() {
  const context = new AudioContext({ sampleRate: config.sample_rate, latencyHint: "interactive" });
  await context.audioWorklet.addModule("worklet.js");
  const player = new AudioWorkletNode(context, "live-player", {
    numberOfInputs: 0,
    outputChannelCount: [config.channels],
  });
  const analyser = new AnalyserNode(context, { fftSize: 2048, smoothingTimeConstant: 0 });
  player.connect(analyser);
  analyser.connect(context.destination);
  if (context.state !== "running") {
    context.resume();
    if (context.state !== "running") {
      showWarning("Click anywhere on the page to hear the audio (the browser blocked autoplay).", 10);
      document.addEventListener("click", () => context.resume(), { once: true });
    }
  }
  return { context, player, analyser };
}

// ---------------------------------------------------------------- the session

async function start() {
  if (session) return;
  showError("");
  const source = document.querySelector('input[name="source"]:checked').value;
  $("start").disabled = true;
  setStatus("starting…");
  const s = { source, stopping: false, inFlight: new Map(), nextSeq: 0, encoding: false };
  session = s;
  try {
    if (!config) config = await loadConfig();
    try {
      s.closeSource = await openSource(source, $("video"));
    } catch (err) {
      throw new Error(err instanceof DOMException ? mediaErrorText(err, source) : err.message);
    }
    s.audio = await openAudio();
    s.audio.player.port.onmessage = (event) => onWorklet(s, event.data);
    stats = freshStats();
    await connect(s);
  } catch (err) {
    showError(err.message || String(err));
    stop();
    return;
  }
  $("stop").disabled = false;
  setStatus(`streaming (stream ${s.stream}, slot ${s.slot})`);
  startFrames(s);
}

// Stops grabbing at once, lets the frames already sent come back (at most a second), then ends the stream.
async function stop() {
  const s = session;
  if (!s) return;
  s.stopping = true;
  session = null;
  clearTimeout(s.timer);
  $("start").disabled = false;
  $("stop").disabled = true;
  const socket = s.socket;
  const deadline = performance.now() + 1000;
  while (socket && socket.readyState === WebSocket.OPEN && s.inFlight.size && performance.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  if (socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({ type: "stop" }));
    socket.close(1000, "stopped");
  }
  if (s.audio) s.audio.context.close();
  if (s.closeSource) s.closeSource();
  if (!session) setStatus("stopped");
}

async function loadConfig() {
  const response = await fetch("config");
  if (!response.ok) throw new Error(`the server's /config answered ${response.status}`);
  const body = await response.json();
  if (body.protocol !== PROTOCOL) {
    throw new Error(`this page speaks protocol ${PROTOCOL}, the server ${body.protocol}: reload the page`);
  }
  $("model").textContent =
    `${body.checkpoint} · ${body.backend} · ${body.frame_size[1]}×${body.frame_size[0]} at ${body.fps} fps · ` +
    `${body.slots} stream${body.slots === 1 ? "" : "s"}`;
  return body;
}

function connect(s) {
  return new Promise((resolve, reject) => {
    const url = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;
    const socket = new WebSocket(url);
    socket.binaryType = "arraybuffer";
    s.socket = socket;
    let ready = false;
    socket.onopen = () => socket.send(JSON.stringify({ type: "hello", protocol: PROTOCOL }));
    socket.onmessage = (event) => {
      if (typeof event.data !== "string") return onChunk(s, event.data);
      const msg = JSON.parse(event.data);
      if (msg.type === "ready") {
        ready = true;
        s.stream = msg.stream;
        s.slot = msg.slot;
        s.frameSize = msg.frame_size;
        stats.stream = msg.stream;
        stats.slot = msg.slot;
        resolve();
      } else if (!ready && msg.type === "error") {
        reject(new Error(msg.message));
      } else {
        onServerMessage(s, msg);
      }
    };
    socket.onerror = () => {
      if (!ready) reject(new Error(`could not connect to ${url}: is \`soundreactor live\` still running?`));
    };
    socket.onclose = (event) => {
      if (!ready) return reject(new Error(event.reason || `the server closed the connection (${event.code})`));
      if (!s.stopping) {
        showError(`The connection to the server was lost${event.reason ? `: ${event.reason}` : ""}.`);
        stop();
      }
    };
  });
}

function onServerMessage(s, msg) {
  if (msg.type === "dropped") {
    s.inFlight.delete(msg.seq);
    stats.droppedFrames++;
    stats.serverDropped++;
    if (msg.reason === "behind") showWarning("The server is behind real time: frames are being dropped.");
  } else if (msg.type === "behind") {
    showWarning(`The server is behind real time by ${Math.round(msg.ms)} ms: frames are being dropped.`);
  } else if (msg.type === "error") {
    showError(`Server: ${msg.message}`);
  }
}

// ---------------------------------------------------------------- frames up

function startFrames(s) {
  const period = 1000 / config.fps;
  const [height, width] = s.frameSize || config.frame_size;
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext("2d", { alpha: false });
  const view = $("modelview");
  view.width = width;
  view.height = height;
  const viewCtx = view.getContext("2d", { alpha: false });
  const begin = performance.now();
  let tick = 0;
  const next = () => {
    if (session !== s) return;
    grab(s, ctx, canvas, viewCtx);
    tick++;
    // Aim at begin + tick * period so timer lateness never accumulates; skip ticks missed entirely.
    const now = performance.now();
    while (begin + tick * period < now - period) {
      tick++;
      stats.droppedFrames++;
    }
    s.timer = setTimeout(next, Math.max(0, begin + tick * period - now));
  };
  next();
}

function grab(s, ctx, canvas, viewCtx) {
  const video = $("video");
  if (video.readyState < 2 || !video.videoWidth) return; // no picture yet
  const socket = s.socket;
  const backlog = s.encoding || socket.bufferedAmount > MAX_BUFFERED_BYTES;
  if (backlog || s.inFlight.size >= MAX_IN_FLIGHT) {
    stats.droppedFrames++;
    if (s.inFlight.size >= MAX_IN_FLIGHT) showWarning("The server is behind real time: frames are being dropped.");
    pruneInFlight(s);
    return;
  }
  // Scale to the session's frame size, cropping the source to its aspect ratio (no bars, no stretching).
  const { width, height } = canvas;
  const scale = Math.max(width / video.videoWidth, height / video.videoHeight);
  const sw = width / scale;
  const sh = height / scale;
  ctx.drawImage(video, (video.videoWidth - sw) / 2, (video.videoHeight - sh) / 2, sw, sh, 0, 0, width, height);
  const shown = performance.now();
  viewCtx.drawImage(canvas, 0, 0);
  const seq = s.nextSeq++;
  s.encoding = true;
  canvas
    .convertToBlob({ type: "image/jpeg", quality: JPEG_QUALITY })
    .then((jpeg) => {
      s.encoding = false;
      if (session !== s || socket.readyState !== WebSocket.OPEN) return;
      const header = new DataView(new ArrayBuffer(4));
      header.setUint32(0, seq, true);
      const sent = performance.now();
      pushBounded(stats.encodes, sent - shown, KEEP);
      s.inFlight.set(seq, { shown, sent });
      socket.send(new Blob([header, jpeg]));
      stats.framesSent++;
    })
    .catch((err) => {
      s.encoding = false;
      showError(`Could not encode a frame as JPEG: ${err.message}`);
    });
}

function pruneInFlight(s) {
  // Frames the server never answered (e.g. lost on a reconnect) must not hold the in-flight count forever.
  const old = performance.now() - 2000;
  for (const [seq, times] of s.inFlight) if (times.sent < old) s.inFlight.delete(seq);
}

// ---------------------------------------------------------------- audio down

function onChunk(s, buffer) {
  const view = new DataView(buffer);
  const expected = 8 + config.samples_per_frame * config.channels * 4;
  if (buffer.byteLength !== expected) {
    showError(`Server sent an audio chunk of ${buffer.byteLength} bytes, expected ${expected}: reload the page.`);
    return;
  }
  const seq = view.getUint32(0, true);
  pushBounded(stats.steps, view.getFloat32(4, true), KEEP);
  const samples = new Float32Array(buffer, 8);
  const times = s.inFlight.get(seq);
  if (times) {
    s.inFlight.delete(seq);
    pushBounded(stats.roundTrips, performance.now() - times.sent, KEEP);
    s.timesBySeq = s.timesBySeq || new Map();
    s.timesBySeq.set(seq, { shown: times.shown, posted: performance.now() });
    if (s.timesBySeq.size > KEEP) s.timesBySeq.delete(s.timesBySeq.keys().next().value); // never played
  }
  const last = stats.seqs.length ? stats.seqs[stats.seqs.length - 1] : -1;
  if (seq <= last) stats.outOfOrder++;
  pushBounded(stats.seqs, seq, SEQS);
  stats.chunksReceived++;
  s.audio.player.port.postMessage({ type: "chunk", seq, samples }, [buffer]);
}

function onWorklet(s, msg) {
  if (msg.type === "clock") {
    stats.underruns = msg.underruns;
    stats.bufferedMs = (msg.buffered * 1000) / s.audio.context.sampleRate;
    stats.cushionMs = (msg.cushion * 1000) / s.audio.context.sampleRate;
    stats.trimmedMs = (msg.droppedSamples * 1000) / s.audio.context.sampleRate;
  } else if (msg.type === "played" || msg.type === "skipped") {
    const times = s.timesBySeq && s.timesBySeq.get(msg.seq);
    if (s.timesBySeq) s.timesBySeq.delete(msg.seq);
    if (msg.type === "skipped" || times === undefined) return; // trimmed away, or never sent from here
    // shown -> handed to the worklet on this page's clock, then the worklet's wait in audio frames. Mapping the
    // render clock onto performance.now() instead rested on that clock keeping real time: in one CI run of
    // headless Chromium it gave a median latency of -0.2 ms, less than the frame's own round trip.
    const latency = times.posted - times.shown + (msg.waited * 1000) / s.audio.context.sampleRate;
    pushBounded(stats.latencies, latency, KEEP);
    pushBounded(stats.history, [times.shown - stats.startedAt, latency], HISTORY);
  }
}

// ---------------------------------------------------------------- drawing

const spectrogram = { column: 0, image: null };

function drawSpectrogram() {
  requestAnimationFrame(drawSpectrogram);
  const canvas = $("spectrogram");
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#0d0f14";
    ctx.fillRect(0, 0, width, height);
  }
  if (!session || !session.audio) return;
  const { analyser, context } = session.audio;
  const bins = new Uint8Array(analyser.frequencyBinCount);
  analyser.getByteFrequencyData(bins);
  const ctx = canvas.getContext("2d");
  // Scroll left by one pixel column, draw the newest column at the right edge.
  ctx.drawImage(canvas, -2, 0);
  const column = ctx.createImageData(2, height);
  const nyquist = context.sampleRate / 2;
  const low = Math.log(40); // the axis labels in index.html assume this range
  const high = Math.log(12000);
  for (let y = 0; y < height; y++) {
    const hz = Math.exp(high - ((high - low) * y) / (height - 1));
    const bin = Math.min(bins.length - 1, Math.round((hz / nyquist) * bins.length));
    const [r, g, b] = colormap(bins[bin] / 255);
    for (let x = 0; x < 2; x++) {
      const k = (y * 2 + x) * 4;
      column.data[k] = r;
      column.data[k + 1] = g;
      column.data[k + 2] = b;
      column.data[k + 3] = 255;
    }
  }
  ctx.putImageData(column, width - 2, 0);
}

function colormap(v) {
  // dark blue -> purple -> orange -> pale yellow
  const stops = [
    [13, 15, 20],
    [60, 30, 120],
    [190, 60, 110],
    [250, 150, 60],
    [255, 245, 200],
  ];
  const x = Math.max(0, Math.min(1, v)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x));
  const t = x - i;
  return stops[i].map((c, k) => Math.round(c + (stops[i + 1][k] - c) * t));
}

function updateReadout() {
  const fmt = (v) => (v === null ? "–" : v.toFixed(0));
  const p50 = percentile(stats.latencies, 0.5);
  const p90 = percentile(stats.latencies, 0.9);
  $("latency").textContent = p50 === null ? "–" : `${fmt(p50)} / ${fmt(p90)}`;
  $("roundtrip").textContent = fmt(percentile(stats.roundTrips, 0.5));
  $("buffered").textContent = session ? fmt(stats.bufferedMs) : "–";
  $("cushion").textContent = session ? fmt(stats.cushionMs) : "–";
  $("step").textContent = fmt(percentile(stats.steps, 0.5));
  $("dropped").textContent = stats.droppedFrames;
  $("sent").textContent = stats.framesSent;
  $("underruns").textContent = stats.underruns;
  if (!$("warning").hidden && performance.now() > warningUntil) $("warning").hidden = true;
}

// ---------------------------------------------------------------- wiring

window.soundreactorLive = {
  // The test hook: counters since the last Start, latency percentiles over the last minute.
  stats() {
    return {
      framesSent: stats.framesSent,
      chunksReceived: stats.chunksReceived,
      underruns: stats.underruns,
      droppedFrames: stats.droppedFrames,
      serverDropped: stats.serverDropped,
      outOfOrder: stats.outOfOrder,
      latencyMs: { p50: percentile(stats.latencies, 0.5), p90: percentile(stats.latencies, 0.9) },
      roundTripMs: { p50: percentile(stats.roundTrips, 0.5), p90: percentile(stats.roundTrips, 0.9) },
      stepMs: { p50: percentile(stats.steps, 0.5) },
      encodeMs: { p50: percentile(stats.encodes, 0.5), p90: percentile(stats.encodes, 0.9) },
      bufferedMs: stats.bufferedMs,
      cushionMs: stats.cushionMs,
      trimmedMs: stats.trimmedMs,
      stream: stats.stream, // of the current or last stream
      slot: stats.slot,
      running: Boolean(session),
      error: $("error").hidden ? null : $("error").textContent,
    };
  },
  history: () => stats.history.slice(), // [ms since Start the frame was shown, latency ms]
  seqs: () => stats.seqs.slice(), // sequence numbers of the chunks received, in arrival order
  start,
  stop, // a promise: resolves once the stream has ended
};

function init() {
  $("start").addEventListener("click", start);
  $("stop").addEventListener("click", stop);
  for (const radio of document.querySelectorAll('input[name="source"]')) {
    radio.addEventListener("change", () => {
      if (radio.value === "file" && radio.checked) $("file").click();
    });
  }
  $("file").addEventListener("change", () => {
    if ($("file").files[0]) setStatus(`file: ${$("file").files[0].name}`);
  });
  const params = new URLSearchParams(location.search);
  const source = params.get("source");
  if (source) {
    const radio = document.querySelector(`input[name="source"][value="${CSS.escape(source)}"]`);
    if (radio) radio.checked = true;
    else showError(`Unknown source "${source}" in the address: use camera, screen or file.`);
  }
  loadConfig()
    .then((body) => {
      config = body;
      if (params.get("autostart") === "1") start();
    })
    .catch((err) => showError(`Could not read the server's configuration: ${err.message}`));
  requestAnimationFrame(drawSpectrogram);
  setInterval(updateReadout, 250);
}

init();
