// Plays the server's audio chunks from a bounded stereo ring buffer with a small adaptive cushion.
//
// The cushion is the audio still buffered when the next chunk arrives: the margin against late chunks. Playback
// starts a cushion after the first chunk arrives; an underrun (the ring runs dry while playing) fades out, grows
// the cushion and waits again; every 5 s without one it shrinks back half a step (a passing load spike must not
// cost latency for good). Latency never builds up: when more than `cushion + maxAhead` is buffered the
// oldest audio is dropped at once, and when the audio left at every chunk's arrival stayed above the cushion for a
// half second (after a slow first frame or a burst) the excess is dropped. Every start after a gap or a drop
// fades in.
// Waits are counted here, on the render clock (currentFrame), because this is where audio is actually played.

const RING_SECONDS = 2; // hard bound on buffered audio
const FADE = 64; // samples of fade at gaps (1.3 ms at 48 kHz)
const CLOCK_EVERY = 8; // render quanta between clock reports to the page
const CALM_SECONDS = 5; // playing this long without an underrun shrinks the cushion by half a step
const TRIM_WINDOW = 15; // chunks (half a second) over which the smallest level on arrival is watched

class LivePlayer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.cushion = ms(opts.cushionMs ?? 20);
    this.cushionMin = this.cushion;
    this.calm = 0; // samples played since the last underrun or shrink
    this.cushionStep = ms(opts.cushionStepMs ?? 10);
    this.cushionMax = ms(opts.cushionMaxMs ?? 80); // past this, gaps come from overload, not jitter
    this.maxAhead = ms(opts.maxAheadMs ?? 60);
    this.slack = ms(opts.slackMs ?? 6); // excess over the cushion tolerated before trimming
    this.lowest = Infinity; // smallest level on a chunk's arrival in this window
    this.arrivals = 0;
    this.capacity = Math.round(RING_SECONDS * sampleRate);
    this.left = new Float32Array(this.capacity);
    this.right = new Float32Array(this.capacity);
    this.written = 0; // absolute sample counts
    this.read = 0;
    this.starts = []; // [{seq, at}]: where each chunk begins, absolute, oldest first
    this.state = "idle"; // idle (nothing to play) -> waiting (the cushion counts down) -> playing
    this.wait = 0; // samples of output still to wait before playing
    this.fadeIn = true;
    this.underruns = 0;
    this.dropped = 0; // samples dropped for being far behind
    this.quanta = 0;
    this.port.onmessage = (event) => this.push(event.data.seq, event.data.samples);
  }

  push(seq, interleaved) {
    const n = interleaved.length >> 1;
    if (this.written + n - this.read > this.capacity) this.skip(this.written + n - this.read - this.capacity);
    if (this.state === "playing") this.trim(this.written - this.read);
    this.starts.push({ seq, at: this.written, arrived: currentFrame });
    for (let i = 0; i < n; i++) {
      const k = (this.written + i) % this.capacity;
      this.left[k] = interleaved[2 * i];
      this.right[k] = interleaved[2 * i + 1];
    }
    this.written += n;
    const buffered = this.written - this.read;
    if (this.state === "idle") {
      this.state = "waiting"; // a chunk is in: play it once the cushion has passed
      this.wait = this.cushion;
    } else if (this.state === "playing" && buffered > this.cushion + n + this.maxAhead) {
      this.skip(buffered - this.cushion - n);
      this.fadeIn = true;
    }
  }

  trim(level) {
    this.lowest = Math.min(this.lowest, level);
    if (++this.arrivals < TRIM_WINDOW) return;
    if (this.lowest > this.cushion + this.slack) {
      this.skip(this.lowest - this.cushion);
      this.fadeIn = true;
    }
    this.lowest = Infinity;
    this.arrivals = 0;
  }

  skip(count) {
    this.read += count;
    this.dropped += count;
    while (this.starts.length && this.starts[0].at < this.read) {
      this.port.postMessage({ type: "skipped", seq: this.starts.shift().seq });
    }
  }

  process(inputs, outputs) {
    const [outL, outR] = outputs[0];
    const size = outL.length;
    if (this.state === "waiting") {
      this.wait -= size;
      if (this.wait <= 0) this.state = "playing";
    }
    if (this.state === "playing") this.play(outL, outR || outL, size);
    if (++this.quanta % CLOCK_EVERY === 0) {
      this.port.postMessage({
        type: "clock",
        buffered: this.written - this.read,
        cushion: this.cushion,
        underruns: this.underruns,
        droppedSamples: this.dropped,
      });
    }
    return true;
  }

  play(outL, outR, size) {
    const count = Math.min(size, this.written - this.read);
    for (let i = 0; i < count; i++) {
      const k = (this.read + i) % this.capacity;
      let gain = 1;
      if (this.fadeIn && i < FADE) gain = i / FADE;
      outL[i] = this.left[k] * gain;
      outR[i] = this.right[k] * gain;
    }
    while (this.starts.length && this.starts[0].at < this.read + count) {
      const start = this.starts.shift();
      // frames from the chunk's arrival here to its first sample played: the page adds the time before it
      // arrived on its own clock, so no mapping between the two clocks is needed
      const waited = Math.max(0, currentFrame + (start.at - this.read) - start.arrived);
      this.port.postMessage({ type: "played", seq: start.seq, waited });
    }
    this.read += count;
    this.fadeIn = false;
    this.calm += count;
    if (this.calm >= CALM_SECONDS * sampleRate) {
      this.cushion = Math.max(this.cushionMin, this.cushion - (this.cushionStep >> 1));
      this.calm = 0;
    }
    if (count < size) {
      // Ran dry: fade the tail out, wait a larger cushion for the next audio.
      for (let i = Math.max(0, count - FADE); i < count; i++) {
        const gain = (count - i) / FADE;
        outL[i] *= gain;
        outR[i] *= gain;
      }
      this.underruns++;
      this.calm = 0;
      this.lowest = Infinity; // a new trim window starts with the next playback
      this.arrivals = 0;
      this.cushion = Math.min(this.cushion + this.cushionStep, this.cushionMax);
      this.state = "idle";
      this.fadeIn = true;
    }
  }
}

function ms(value) {
  return Math.round((value * sampleRate) / 1000);
}

registerProcessor("live-player", LivePlayer);
