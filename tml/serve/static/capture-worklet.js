// tml serve: microphone capture AudioWorklet.
// Resamples the context's rate (sampleRate, e.g. 48 kHz) to 16 kHz by linear interpolation
// after a moving-average pre-filter of width ratio (a crude low-pass against aliasing),
// and posts one Int16Array of 3,200 samples (200 ms, one micro-turn) at a time.
const TARGET_RATE = 16000;
const CHUNK = 3200;

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ratio = sampleRate / TARGET_RATE;   // input samples per output sample
    this.pos = 0;                            // fractional read position in this.buf
    this.buf = new Float32Array(0);
    this.out = new Int16Array(CHUNK);
    this.n = 0;
    this.width = Math.max(1, Math.round(this.ratio));
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true;
    const ch = input[0];
    const merged = new Float32Array(this.buf.length + ch.length);
    merged.set(this.buf);
    merged.set(ch, this.buf.length);
    while (this.pos + this.width + 1 < merged.length) {
      const i = Math.floor(this.pos), f = this.pos - i;
      let a = 0, b = 0;
      for (let k = 0; k < this.width; k++) { a += merged[i + k]; b += merged[i + k + 1]; }
      const x = ((1 - f) * a + f * b) / this.width;
      this.out[this.n++] = Math.max(-32768, Math.min(32767, Math.round(x * 32767)));
      if (this.n === CHUNK) {
        this.port.postMessage(this.out.buffer, [this.out.buffer]);
        this.out = new Int16Array(CHUNK);
        this.n = 0;
      }
      this.pos += this.ratio;
    }
    const keep = Math.floor(this.pos);
    this.buf = merged.slice(keep);
    this.pos -= keep;
    return true;
  }
}

registerProcessor("tml-capture", CaptureProcessor);
