// The page's microphone as PCM chunks (docs/protocol.md, kind 4): the audio thread gathers
// 20 ms of mono samples, turns them into int16 and hands them to the page, which sends them to
// its own call program. Runs in the AudioWorklet scope (no DOM).
"use strict";

class MicPcm extends AudioWorkletProcessor {
  constructor() {
    super();
    this.size = Math.round(sampleRate / 50);  // 20 ms
    this.chunk = new Int16Array(this.size);
    this.filled = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;
    const n = channels[0].length;
    for (let i = 0; i < n; i++) {
      let v = 0;
      for (const ch of channels) v += ch[i];  // a stereo microphone: its mono mix
      v /= channels.length;
      this.chunk[this.filled++] = Math.max(-32768, Math.min(32767, Math.round(v * 32767)));
      if (this.filled === this.size) {
        this.port.postMessage(this.chunk.buffer, [this.chunk.buffer]);  // (transferred: detached here)
        this.chunk = new Int16Array(this.size);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("mic-pcm", MicPcm);
