// Browser client of the neural video call (protocol: docs/protocol.md, version 2).
//
// Two kinds of page, by the link that opened it:
// * a viewer (the viewers' or camera link): watches. It draws the decoded picture (kind 1) and,
//   frame-aligned next to it, the original (kind 2), shows the call's stats, a connection-quality
//   indicator and a chart; the camera link may also feed a one-way sender's --source browser
//   (its camera, kind 3, and, when that sender's sound is the page's, its microphone, kind 4)
//   and change its bitrate target.
// * a caller's own page (role=face, the link `streamer.call` prints): the call's face. The other
//   person large, yourself small; hang up, mute microphone / camera, the bitrate of your own
//   sender, full screen. It steers that one program only; with `--source browser` its camera
//   (kind 3) and microphone (kind 4, PCM) feed that program.
// Pictures carry their sender's peer id (stamped by the server), so a page tells the two callers'
// pictures apart.
"use strict";

const PICTURE_FORMAT = 0x82;       // byte 0 of every picture (picture format 2)
const KIND_DECODED = 1, KIND_ORIGINAL = 2, KIND_CAMERA = 3, KIND_AUDIO = 4;
const HEADER_BYTES = 18;           // format, kind, sender (4), frame (u32), timestamp µs (u64)
const CAMERA_FPS = 20;
const CAMERA_MAX_WIDTH = 640;
const CAMERA_JPEG_QUALITY = 0.8;
const MAX_BUFFERED = 256 * 1024;   // don't queue a camera frame behind this much unsent data
const MIC_RATE = 48000;
const CHART_SECONDS = 60;
const ORIGINALS_KEPT = 90;         // originals held by frame number, waiting for their decoded frame
const FATAL_CLOSE = new Set([1008, 1009, 4000]);  // refused or replaced: retrying won't help
const BITRATE_ANSWER_MS = 5000;    // say so when the sender has not answered by then

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const room = params.get("room"), token = params.get("token");
const linkRole = params.get("role") || "viewer";  // which of the server's links this is
const PROGRAM_LINKS = { sender: "streamer.send", receiver: "streamer.receive", caller: "streamer.call" };
const face = linkRole === "face";   // a caller's own page
const faceOf = face ? params.get("peer") : null;

// Counters the page shows (and tests read).
const state = window.callState = {
  mode: face ? "face" : "viewer",
  joined: false,
  peerId: null,
  faceOf,                     // a caller's page: its program's peer id
  other: null,                // ... and the other caller's
  maySendCamera: false,       // the camera link's token lets this page feed the call
  maySetBitrate: false,       // ... and change the sender's bitrate target
  bitrate: { asked: null, answer: null },  // kbps awaiting an answer; the sender's last answer
  peers: new Map(),           // peer_id → role
  drawn: { [KIND_DECODED]: 0, [KIND_ORIGINAL]: 0 },
  drawnSelf: 0,               // a caller's page: pictures of yourself drawn
  shownFrame: null,           // frame number of the decoded picture shown now
  aligned: { exact: 0, nearest: 0, originalFrame: null },
  cameraSent: 0,
  cameraEchoes: 0,            // decoded pictures that were this page's camera frames
  pcmSent: 0,                 // microphone chunks sent (kind 4)
  muted: { camera: false, microphone: false },
  otherCameraMuted: false,    // the other caller's stats say its camera is off
  callEnded: null,            // a caller's page: why the call is over
  fullscreen: false,
  quality: { incoming: null, outgoing: null },
  chart: null,
  stats: { sender: {}, receiver: {}, page: {} },   // as received (the watched direction)
  view: { sender: {}, receiver: {}, page: {}, mySend: {}, theirRecv: {} },  // numbers as shown
};

let ws = null;

// ---- connection -------------------------------------------------------------------------

function setStatus(text, cls = "") {
  const el = $("status");
  el.textContent = text;
  el.className = "status " + cls;
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  ws = new WebSocket(`${scheme}//${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => {
    const join = face ? { type: "join", room, token, role: "face", peer: faceOf, name: "browser" }
      : { type: "join", room, token, role: "viewer", name: "browser" };
    ws.send(JSON.stringify(join));
  };
  ws.onmessage = (ev) => {
    if (typeof ev.data === "string") onControl(JSON.parse(ev.data));
    else onPicture(ev.data);
  };
  ws.onclose = (ev) => {
    state.joined = false;
    stopCamera(false);
    stopMedia();
    state.peers.clear();
    showPeers();
    if (FATAL_CLOSE.has(ev.code) || state.callEnded) return;  // the error message explains it
    setStatus("disconnected — reconnecting…", "error");
    setTimeout(connect, 2000);
  };
}

function send(obj) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj));
}

function onControl(msg) {
  switch (msg.type) {
    case "joined":
      state.joined = true;
      state.peerId = msg.peer_id;
      state.maySendCamera = msg.may_send_camera === true;
      state.maySetBitrate = msg.may_set_bitrate === true;
      showCameraRight();
      showBitrateRight();
      state.peers = new Map(msg.peers.map((p) => [p.peer_id, p.role]));
      showPeers();
      setStatus(face ? "joined — waiting for the other person" : "joined — waiting for pictures", "live");
      break;
    case "peer_joined":
      state.peers.set(msg.peer_id, msg.role);
      showPeers();
      break;
    case "peer_left":
      state.peers.delete(msg.peer_id);
      if (face) callerLeft(msg.peer_id);
      showPeers();
      break;
    case "stats":
      onStats(msg);
      break;
    case "bitrate":
      onBitrateAnswer(msg);
      break;
    case "camera":
      // Another viewer took over the call's camera.
      if (!msg.on && cameraStream) {
        stopCamera(false);
        $("camera-note").textContent = "Another viewer's camera now feeds the call.";
      }
      break;
    case "error":
      // A refused bitrate is shown at its control; the call goes on.
      if (msg.about === "set_bitrate") onBitrateAnswer({ ok: false, message: msg.message });
      else if (msg.about === "mute" || msg.about === "hangup") {
        $("controls-note").textContent = msg.message;
        $("controls-note").hidden = false;
      }
      else setStatus(`${msg.code}: ${msg.message}`, "error");
      break;
  }
}

function showCameraRight() {
  if (face) return;  // a caller's page: its program's --source decides (see onStats)
  $("camera").disabled = !state.maySendCamera;
  $("camera-note").textContent = state.maySendCamera ? "" :
    "This link only watches. The camera link the server printed may feed the call.";
}

function callerIds() {
  return [...state.peers].filter(([, role]) => role === "caller").map(([id]) => id);
}

function peerWithRole(role) {
  for (const [id, r] of state.peers) if (r === role) return id;
  return null;
}

function showPeers() {
  const roles = new Set(state.peers.values());
  for (const role of ["sender", "receiver"]) {
    $("peer-" + role).classList.toggle("present", roles.has(role));
  }
  const callers = callerIds();
  if (face) state.other = callers.find((id) => id !== faceOf) || null;
  const twoWay = face || callers.length > 0;
  $("peer-sender").hidden = $("peer-receiver").hidden = twoWay;
  $("peer-callers").hidden = !twoWay;
  $("peer-callers").textContent = `callers ${callers.length}/2`;
  $("peer-callers").classList.toggle("present", callers.length === 2);
  labelPictures();
}

// Which direction this page watches: `rx` shows the big picture (its kind-1 pictures and its
// receive stats), `tx` sends it (its kind-2 originals and its send stats). Peer ids for callers,
// and for a one-way call's sender and receiver.
function watched() {
  if (face) return { rx: faceOf, tx: state.other };
  const callers = callerIds();
  if (callers.length) return { rx: callers[0], tx: callers[1] || null };
  return { rx: peerWithRole("receiver"), tx: peerWithRole("sender") };
}

function labelPictures() {
  const callers = callerIds();
  if (face) {
    $("decoded-label").textContent = "the other person";
    $("original-label").textContent = "their original (frame-aligned)";
    $("col-sender").textContent = "their sender";
    $("col-receiver").textContent = "your receiver";
  } else if (callers.length) {
    const w = watched();
    $("decoded-label").textContent = `caller ${w.rx} sees`;
    $("original-label").textContent = `original at caller ${w.tx || "–"} (frame-aligned)`;
    $("col-sender").textContent = "sending caller";
    $("col-receiver").textContent = "showing caller";
  }
}

// ---- a caller's page: controls ------------------------------------------------------------

function callerLeft(id) {
  if (state.callEnded) return;
  if (id === faceOf) {
    endCall(hangupSent ? "You hung up: the call is over." :
      (otherLeftFirst ? "The other person hung up: the call is over." :
        "Your call program has left: the call is over."));
  } else if (id === state.other) {
    otherLeftFirst = true;  // its bye reaches our program, which ends the call (or waits: --stay)
    $("big-note").textContent = "the other person left";
    $("big-note").hidden = false;
  }
}

let hangupSent = false, otherLeftFirst = false;

function endCall(reason) {
  state.callEnded = reason;
  setStatus(reason, "error");
  $("big-note").textContent = reason;
  $("big-note").hidden = false;
  for (const id of ["hangup", "fs-hangup", "mute-mic", "mute-camera", "bitrate"]) $(id).disabled = true;
  if (document.fullscreenElement) document.exitFullscreen();
  stopMedia();
}

function hangUp() {
  hangupSent = true;
  send({ type: "hangup" });
  $("hangup").disabled = $("fs-hangup").disabled = true;
  setStatus("hanging up…", "error");
}

function sendMute() {
  send({ type: "mute", camera: state.muted.camera, microphone: state.muted.microphone });
}

function toggleMute(what) {
  state.muted[what] = !state.muted[what];
  const button = $(what === "camera" ? "mute-camera" : "mute-mic");
  const name = what === "camera" ? "camera" : "microphone";
  button.setAttribute("aria-pressed", String(state.muted[what]));
  button.textContent = state.muted[what] ? `Unmute ${name}` : `Mute ${name}`;
  if (what === "camera") {
    // no new frames: the program discards its source's (and this page stops sending its own)
    cameraStream?.getVideoTracks().forEach((t) => { t.enabled = !state.muted.camera; });
    $("self-note").hidden = !state.muted.camera;
  } else {
    micStream?.getAudioTracks().forEach((t) => { t.enabled = !state.muted.microphone; });
  }
  sendMute();
}

function toggleFullscreen() {
  if (document.fullscreenElement) document.exitFullscreen();
  else $("big-box").requestFullscreen().catch((err) => {
    $("controls-note").textContent = `Full screen refused: ${err.message || err}`;
    $("controls-note").hidden = false;
  });
}

document.addEventListener("fullscreenchange", () => {
  state.fullscreen = document.fullscreenElement === $("big-box");
  $("fullscreen").textContent = state.fullscreen ? "Exit full screen" : "Full screen";
});

// ---- bitrate target -----------------------------------------------------------------------

let bitrateTimer = null, bitrateFromStats = false;

function showBitrateRight() {
  $("bitrate").disabled = !state.maySetBitrate;
  bitrateNote(state.maySetBitrate ? "" :
    "This link only watches. The camera link the server printed may change the bitrate.");
}

function bitrateNote(text, isError = false) {
  $("bitrate-note").textContent = text;
  $("bitrate-note").className = "muted" + (isError ? " error" : "");
}

function askBitrate() {
  const kbps = Number($("bitrate").value);
  state.bitrate.asked = kbps;
  send({ type: "set_bitrate", kbps });
  bitrateNote(`asking ${face ? "your sender" : "the sender"} for ${kbps} kbps…`);
  clearTimeout(bitrateTimer);
  bitrateTimer = setTimeout(() => {
    if (state.bitrate.asked === kbps) bitrateNote("the sender has not answered (yet)", true);
  }, BITRATE_ANSWER_MS);
}

// {ok, target_kbps, message}: the sender's answer, or the server's when it refused the ask.
function onBitrateAnswer(msg) {
  state.bitrate.asked = null;
  state.bitrate.answer = msg;
  clearTimeout(bitrateTimer);
  bitrateNote(msg.message || (msg.ok ? "set" : "refused"), !msg.ok);
  if (typeof msg.target_kbps === "number") selectBitrate(msg.target_kbps);
}

// Show `kbps` in the select, adding it when the sender runs at a target not listed (--kbps 250).
function selectBitrate(kbps) {
  const select = $("bitrate"), value = String(kbps);
  if (![...select.options].some((o) => o.value === value)) {
    const option = new Option(`${value} kbps`, value);
    const after = [...select.options].find((o) => Number(o.value) > kbps);
    select.add(option, after || null);
  }
  select.value = value;
}

// The target the sender this control steers holds (lowered while the channel is congested) and
// what it sent; without target_kbps it codes at a fixed level. A caller's page steers its own
// sender; a viewer's, the one-way sender.
function showBitrateNow() {
  const tx = face ? state.view.mySend : state.view.sender;
  const sent = typeof tx.kbps === "number" ? ` · sent ${tx.kbps.toFixed(0)} kbps` : "";
  if (typeof tx.target_kbps === "number") {
    $("bitrate-now").textContent = `target ${tx.target_kbps.toFixed(0)} kbps${sent}`;
    if (!bitrateFromStats) selectBitrate(Math.round(tx.target_kbps));  // the sender's own start
    bitrateFromStats = true;
  } else if (Object.keys(tx).length) {
    $("bitrate-now").textContent = `fixed level, no rate control${sent}`;
  }
}

// ---- pictures ---------------------------------------------------------------------------

// One decode per target at a time; a picture that arrives meanwhile replaces the waiting one, so
// a slow machine shows fewer, but always recent, frames. Originals are not drawn on arrival:
// they are held by frame number and drawn with the decoded picture of the same frame.
const pending = new Map(), decoding = new Set();
const originals = new Map();  // frame → {blob, timestampUs} of the watched sender's originals
let framesThisSecond = 0, latencyMs = null, formatWarned = false;

function hex(view, offset, n) {
  let s = "";
  for (let i = 0; i < n; i++) s += view.getUint8(offset + i).toString(16).padStart(2, "0");
  return s;
}

function onPicture(buf) {
  const view = new DataView(buf);
  if (buf.byteLength < HEADER_BYTES || view.getUint8(0) !== PICTURE_FORMAT) {
    if (!formatWarned) console.warn("not a picture of format 2; ignored");
    formatWarned = true;
    return;
  }
  const kind = view.getUint8(1), sender = hex(view, 2, 4);
  const pic = {
    frame: view.getUint32(6),
    timestampUs: Number(view.getBigUint64(10)),
    blob: new Blob([new Uint8Array(buf, HEADER_BYTES)], { type: "image/jpeg" }),
  };
  const w = watched();
  let target = null;
  if (kind === KIND_DECODED && sender === w.rx) target = "decoded";
  else if (kind === KIND_ORIGINAL && face && sender === faceOf) target = "self";
  else if (kind === KIND_ORIGINAL && sender === w.tx) {
    holdOriginal(pic);
    return;
  }
  if (target === null) return;  // (e.g. the other caller's view of you)
  pending.set(target, pic);
  if (!decoding.has(target)) drawNext(target);
}

function holdOriginal(pic) {
  originals.set(pic.frame, pic);
  while (originals.size > ORIGINALS_KEPT) originals.delete(originals.keys().next().value);
  // it came after its decoded frame (possible: they travel separately): draw it now
  if (pic.frame === state.shownFrame && state.aligned.originalFrame !== pic.frame &&
      (!face || $("compare").checked)) drawOriginal(pic.frame);
}

function draw(canvasId, bitmap) {
  const canvas = $(canvasId);
  if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
  }
  canvas.getContext("2d").drawImage(bitmap, 0, 0);
}

async function drawNext(target) {
  const pic = pending.get(target);
  if (!pic) return;
  pending.delete(target);
  decoding.add(target);
  try {
    const bitmap = await createImageBitmap(pic.blob);
    const size = `${bitmap.width}×${bitmap.height}`;
    draw(target, bitmap);
    bitmap.close();
    if (target === "self") {
      state.drawnSelf++;
      $("self-box").hidden = false;
      return;
    }
    state.drawn[KIND_DECODED]++;
    state.shownFrame = pic.frame;
    framesThisSecond++;
    // Timestamps are epoch µs: meaningful when sender and browser share a clock.
    const ms = Date.now() - pic.timestampUs / 1000;
    // The sender keeps our capture time, so this picture may be our own camera frame.
    if (sentStamps.delete(pic.timestampUs)) state.cameraEchoes++;
    latencyMs = ms >= 0 && ms < 60000 ? ms : null;
    $("decoded-info").textContent = `#${pic.frame} · ${size}`;
    if (!state.callEnded) setStatus("live", "live");
    if (!face || $("compare").checked) drawOriginal(pic.frame);
  } catch (err) {
    console.warn("undecodable picture", err);
  } finally {
    decoding.delete(target);
    if (pending.has(target)) drawNext(target);
  }
}

// The original of `frame` next to its decoded picture; when that one is not held (thinned on
// the way), the nearest earlier one, said so in the caption.
let drawingOriginal = false;

async function drawOriginal(frame) {
  if (drawingOriginal) return;
  let pic = originals.get(frame), exact = true;
  if (!pic) {
    exact = false;
    for (const [n, p] of originals) if (n < frame && (!pic || n > pic.frame)) pic = p;
  }
  if (!pic) return;
  drawingOriginal = true;
  try {
    const bitmap = await createImageBitmap(pic.blob);
    draw("original", bitmap);
    bitmap.close();
    state.drawn[KIND_ORIGINAL]++;
    state.aligned.originalFrame = pic.frame;
    if (exact) state.aligned.exact++; else state.aligned.nearest++;
    $("original-box").hidden = false;
    $("original-info").textContent = exact ? `#${pic.frame}` : `#${pic.frame} (nearest to #${frame})`;
    for (const n of originals.keys()) if (n < pic.frame) originals.delete(n);  // older: never needed
  } catch (err) {
    console.warn("undecodable original", err);
  } finally {
    drawingOriginal = false;
  }
}

// ---- stats -----------------------------------------------------------------------------

const ROWS = [
  ["fps", "fps", 1], ["kbps", "kbps", 0], ["latency_ms", "latency ms", 0],
  ["psnr", "PSNR dB", 1], ["loss", "loss %", 1],
];
const HIDDEN_KEYS = new Set(["t"]);
const previous = {};

// Stats are free-form: latency may be a number or {p50, p95, max}; loss may come as a fraction
// (`loss`) or as running totals (`lost` next to `frames`), turned here into a per-update rate.
// `key` names the series (each keeps its own totals).
function normalize(key, stats) {
  const out = {};
  for (const [k, v] of Object.entries(stats)) {
    if (typeof v === "number" && isFinite(v)) out[k] = v;
    else if (v && typeof v === "object" && typeof v.p50 === "number") out[k] = v.p50;
  }
  if (out.loss === undefined && typeof out.lost === "number" && typeof out.frames === "number") {
    const prev = previous[key];
    if (prev) {
      const lost = out.lost - prev.lost, shown = out.frames - prev.frames;
      if (lost >= 0 && shown >= 0 && lost + shown > 0) out.loss = lost / (lost + shown);
      else if (lost >= 0 && shown >= 0) out.loss = 0;
    }
    previous[key] = { lost: out.lost, frames: out.frames };
  }
  return out;
}

// A caller's stats: its receive direction at the top level, its send direction under "send".
function receivePart(stats) {
  const { send, ...rx } = stats;
  return rx;
}

function onStats(msg) {
  const stats = msg.stats || {};
  const from = msg.from || (msg.from_role === "sender" || msg.from_role === "receiver" ?
    peerWithRole(msg.from_role) : null);
  if (!from) return;
  const isCaller = msg.from_role === "caller";
  const w = watched();
  if (from === w.rx) {
    const rx = isCaller ? receivePart(stats) : stats;
    state.stats.receiver = rx;
    state.view.receiver = normalize("receiver", rx);
    if (face) state.view.mySend = normalize("mySend", stats.send || {});
    if (face && stats.send) onOwnProgram(stats.send);
  }
  if (from === w.tx) {
    const tx = isCaller ? (stats.send || {}) : stats;
    state.stats.sender = tx;
    state.view.sender = normalize("sender", tx);
    startViewerMic();  // (only when our camera feeds this sender and its sound is ours)
    state.otherCameraMuted = isCaller && tx.camera_muted === true;
    if (face) state.view.theirRecv = normalize("theirRecv", receivePart(stats));
    if (face || isCaller) {
      $("big-note").hidden = !state.otherCameraMuted || !!state.callEnded;
      if (state.otherCameraMuted) $("big-note").textContent = "their camera is off";
    }
  }
  renderStats();
  showBitrateNow();
  showQuality();
}

// Our own program's send stats: whether this page is its camera and microphone (--source browser),
// and what it uses of a camera frame: its capture rate and its model's frame size.
let programFps = null, programSize = null;

function onOwnProgram(send) {
  if (typeof send.capture_fps === "number" && send.capture_fps > 0) programFps = send.capture_fps;
  if (typeof send.frame_size === "number" && send.frame_size > 0) programSize = send.frame_size;
  if (send.source === "browser" && !mediaWanted && !state.callEnded) {
    mediaWanted = true;
    startMedia();
  }
}

function fmt(key, value, digits) {
  if (typeof value !== "number" || !isFinite(value)) return "–";
  if (key === "loss") value *= 100;  // a fraction on the wire, a percentage on screen
  return value.toFixed(Number.isInteger(value) && key !== "loss" ? 0 : digits);
}

function row(key, label, digits) {
  const tr = document.createElement("tr");
  tr.dataset.key = key;
  const cells = [label].concat(["sender", "receiver", "page"].map(
    (role) => fmt(key, state.view[role][key], digits)));
  for (const text of cells) {
    const td = document.createElement("td");
    td.textContent = text;
    tr.appendChild(td);
  }
  return tr;
}

function renderStats() {
  const known = new Set(ROWS.map((r) => r[0]));
  const extra = new Set();
  for (const role of ["sender", "receiver"]) {
    for (const k of Object.keys(state.view[role])) {
      if (!known.has(k) && !HIDDEN_KEYS.has(k)) extra.add(k);
    }
  }
  $("stats").tBodies[0].replaceChildren(...ROWS.map(([k, label, d]) => row(k, label, d)));
  $("more-stats").tBodies[0].replaceChildren(
    ...[...extra].sort().map((k) => row(k, k.replace(/_/g, " "), 1)));
}

// ---- connection quality -------------------------------------------------------------------

// good / fair / poor from loss, delay (capture → shown, p50) and rate (kbps received against the
// sender's target): the worst of the three. A muted camera sends nothing: not a bad connection.
const QUALITY = {
  loss: [0.02, 0.08],        // fraction of frames lost: good below the first, fair below the second
  delay: [150, 400],         // ms
  rate: [0.5, 0.25],         // kbps / target: good at or above the first, fair at or above the second
};
const GRADES = ["good", "fair", "poor"];

function grade(rx, tx, muted) {
  const q = { loss: rx.loss, delay: rx.latency_ms, kbps: rx.kbps, target: tx.target_kbps, fps: rx.fps };
  const worst = [];
  if (typeof q.loss === "number") worst.push(q.loss < QUALITY.loss[0] ? 0 : q.loss < QUALITY.loss[1] ? 1 : 2);
  if (typeof q.delay === "number") worst.push(q.delay < QUALITY.delay[0] ? 0 : q.delay < QUALITY.delay[1] ? 1 : 2);
  if (!muted && typeof q.kbps === "number" && typeof q.target === "number" && q.target > 0) {
    const r = q.kbps / q.target;
    worst.push(r >= QUALITY.rate[0] ? 0 : r >= QUALITY.rate[1] ? 1 : 2);
  }
  q.level = worst.length ? GRADES[Math.max(...worst)] : "unknown";
  q.muted = muted;
  return q;
}

function qualityText(q) {
  if (q.muted && typeof q.kbps !== "number") return "camera off";
  const parts = [];
  parts.push(`loss ${typeof q.loss === "number" ? (q.loss * 100).toFixed(1) : "–"} %`);
  parts.push(`delay ${typeof q.delay === "number" ? q.delay.toFixed(0) : "–"} ms`);
  const rate = typeof q.kbps === "number" ? q.kbps.toFixed(0) : "–";
  parts.push(typeof q.target === "number" ? `${rate} of ${q.target.toFixed(0)} kbps` : `${rate} kbps`);
  if (q.muted) parts.push("camera off");
  return parts.join(" · ");
}

function showGrade(id, q) {
  const el = $(id).querySelector(".grade");
  el.textContent = q.level === "unknown" ? "–" : q.level;
  el.className = "grade " + q.level;
  $(id).querySelector(".numbers").textContent = qualityText(q);
}

function showQuality() {
  const incoming = grade(state.view.receiver, state.view.sender, state.otherCameraMuted);
  state.quality.incoming = incoming;
  showGrade("quality-in", incoming);
  if (face) {
    $("quality-in").querySelector(".what").textContent = "their picture to you";
    const outgoing = grade(state.view.theirRecv, state.view.mySend, state.muted.camera);
    state.quality.outgoing = outgoing;
    $("quality-out").hidden = false;
    showGrade("quality-out", outgoing);
  }
}

// ---- chart ---------------------------------------------------------------------------------

// Once a second: this page's own fps/latency, and one chart sample.
const history = [];
setInterval(() => {
  state.view.page = { fps: framesThisSecond, latency_ms: latencyMs ?? undefined };
  if (framesThisSecond === 0 && $("status").textContent === "live") {
    setStatus(face ? "connected — no new pictures" : "joined — waiting for pictures", "live");
  }
  framesThisSecond = 0;
  renderStats();
  const rx = state.view.receiver, tx = state.view.sender;
  history.push({
    kbps: rx.kbps ?? tx.kbps ?? null,
    latency: rx.latency_ms ?? latencyMs ?? null,
  });
  if (history.length > CHART_SECONDS) history.shift();
  drawChart();
}, 1000);

// 1, 2 or 5 times a power of ten, at least `v` (an axis maximum with round tick labels).
function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function drawChart() {
  const canvas = $("chart"), ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  const left = 40, right = 40, top = 18, bottom = 30;
  const pw = w - left - right, ph = h - top - bottom;
  ctx.clearRect(0, 0, w, h);
  ctx.font = "10px system-ui, sans-serif";
  const series = [
    { key: "kbps", color: "#4f9dff", side: "left", title: "kbps" },
    { key: "latency", color: "#ffb454", side: "right", title: "ms" },
  ];
  const TICKS = 4;
  for (const s of series) {
    const values = history.map((p) => p[s.key]).filter((v) => v !== null);
    s.max = niceMax(Math.max(0, ...values));
  }
  // grid and y ticks: each series its own axis (left kbps, right ms)
  ctx.strokeStyle = "#2c313a";
  ctx.lineWidth = 1;
  for (let i = 0; i <= TICKS; i++) {
    const y = top + (ph * i) / TICKS;
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(left + pw, y); ctx.stroke();
    for (const s of series) {
      const value = (s.max * (TICKS - i)) / TICKS;
      ctx.fillStyle = s.color;
      ctx.textAlign = s.side === "left" ? "right" : "left";
      ctx.textBaseline = "middle";
      ctx.fillText(fmtTick(value), s.side === "left" ? left - 4 : left + pw + 4, y);
    }
  }
  // axis titles
  ctx.textBaseline = "alphabetic";
  for (const s of series) {
    ctx.fillStyle = s.color;
    ctx.textAlign = s.side === "left" ? "left" : "right";
    ctx.fillText(s.title, s.side === "left" ? 2 : w - 2, 10);
  }
  // x axis: a time scale, seconds before now
  const xTicks = [];
  ctx.fillStyle = "#8b93a1";
  ctx.textAlign = "center";
  for (let ago = CHART_SECONDS; ago >= 0; ago -= 15) {
    const x = left + pw * (1 - ago / CHART_SECONDS);
    ctx.beginPath(); ctx.moveTo(x, top + ph); ctx.lineTo(x, top + ph + 4); ctx.stroke();
    const label = ago === 0 ? "now" : `−${ago} s`;
    ctx.fillText(label, x, top + ph + 14);
    xTicks.push(label);
  }
  ctx.fillText("time (seconds ago)", left + pw / 2, h - 2);
  // the lines: the newest sample at "now", one sample a second
  const n = history.length;
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    let started = false;
    history.forEach((p, i) => {
      const v = p[s.key];
      if (v === null) { started = false; return; }
      const ago = n - 1 - i;
      const x = left + pw * (1 - ago / CHART_SECONDS);
      const y = top + ph - (ph * v) / s.max;
      if (started) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      started = true;
    });
    ctx.stroke();
  }
  state.chart = {
    xTicks, xTitle: "time (seconds ago)", samples: n,
    yLeft: { title: "kbps", max: series[0].max }, yRight: { title: "ms", max: series[1].max },
  };
}

function fmtTick(v) {
  return v >= 1000 ? `${(v / 1000).toFixed(v % 1000 ? 1 : 0)}k` : v.toFixed(v % 1 ? 1 : 0);
}

// ---- camera -----------------------------------------------------------------------------

let cameraStream = null, cameraTimer = null, encoding = false, cameraFrame = 0;
const sentStamps = new Set();  // capture times (µs) of recent camera frames we sent
const grab = document.createElement("canvas");

function pictureMessage(kind, frame, timestampUs, payload) {
  const msg = new Uint8Array(HEADER_BYTES + payload.length);
  const view = new DataView(msg.buffer);
  view.setUint8(0, PICTURE_FORMAT);
  view.setUint8(1, kind);
  // bytes 2-5, the sender: zeros (the server stamps who we are)
  view.setUint32(6, frame >>> 0);
  view.setBigUint64(10, timestampUs);
  msg.set(payload, HEADER_BYTES);
  return msg;
}

async function openCamera() {
  if (!navigator.mediaDevices?.getUserMedia) {
    $("camera-note").textContent = "This browser gives no camera here (it needs http://localhost or https).";
    return null;
  }
  try {
    return await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 30 } },
      audio: false,
    });
  } catch (err) {
    $("camera-note").textContent = `No camera: ${err.message || err.name}`;
    return null;
  }
}

async function startCamera() {
  cameraStream = await openCamera();
  if (!cameraStream) return;
  const preview = $("preview");
  preview.srcObject = cameraStream;
  preview.hidden = face;  // a caller's page shows you as your program sends you (small picture)
  await preview.play().catch(() => {});
  if (!face) send({ type: "camera", on: true });
  // a caller's page: no more frames than its program captures (each is a JPEG through the server)
  cameraTimer = setInterval(sendCameraFrame, 1000 / Math.min(CAMERA_FPS, (face && programFps) || CAMERA_FPS));
  if (face) {
    $("camera-note").textContent = "This page's camera and microphone feed your call.";
    return;
  }
  $("camera").textContent = "Stop my camera";
  $("camera").setAttribute("aria-pressed", "true");
  $("camera-note").textContent = "Your camera feeds the call's sender.";
  startViewerMic();
}

// The camera link's page sends its microphone too when the sender's sound is the page's
// (`streamer.send --source browser`, its --audio auto): the sender's stats say so.
let micStarting = false;

async function startViewerMic() {
  if (face || !cameraStream || micStream || micStarting || state.stats.sender?.audio !== "browser") return;
  micStarting = true;
  try {
    await startMicrophone();
  } finally {
    micStarting = false;
  }
  if (!cameraStream) stopMicrophone();  // the camera stopped meanwhile
  else if (micStream) {
    $("camera-note").textContent = "Your camera and microphone feed the call's sender.";
    $("camera-mic").hidden = false;
  }
}

// The camera link's own microphone switch: while muted no chunks leave this page, and the
// sender's sound is silence (there is no program of ours to tell).
function toggleViewerMic() {
  state.muted.microphone = !state.muted.microphone;
  micStream?.getAudioTracks().forEach((t) => { t.enabled = !state.muted.microphone; });
  $("camera-mic").setAttribute("aria-pressed", String(state.muted.microphone));
  $("camera-mic").textContent = state.muted.microphone ? "Unmute my microphone" : "Mute my microphone";
}

function stopCamera(tellServer = true) {
  if (!cameraStream) return;
  clearInterval(cameraTimer);
  cameraStream.getTracks().forEach((t) => t.stop());
  cameraStream = null;
  $("preview").hidden = true;
  $("preview").srcObject = null;
  if (tellServer && !face) send({ type: "camera", on: false });
  if (!face) {
    stopMicrophone();
    $("camera-mic").hidden = true;
    if (state.muted.microphone) toggleViewerMic();  // the next camera starts unmuted
  }
  $("camera").textContent = "Send my camera";
  $("camera").setAttribute("aria-pressed", "false");
  $("camera-note").textContent = "";
}

function sendCameraFrame() {
  const video = $("preview");
  if (face && state.muted.camera) return;  // muted: no frames leave this page
  // Latest-only: skip this tick while a frame is being encoded or the socket is backed up.
  if (encoding || !ws || ws.readyState !== WebSocket.OPEN || ws.bufferedAmount > MAX_BUFFERED) return;
  if (!video.videoWidth) return;
  // A caller's page sends the frame scaled so that its short side is its program's model size:
  // the program crops the same centred square either way (the same framing), with a quarter of
  // the bytes to carry.
  const shortSide = Math.min(video.videoWidth, video.videoHeight);
  const scale = face && programSize ? Math.min(1, programSize / shortSide)
    : Math.min(1, CAMERA_MAX_WIDTH / video.videoWidth);
  grab.width = Math.round(video.videoWidth * scale);
  grab.height = Math.round(video.videoHeight * scale);
  grab.getContext("2d").drawImage(video, 0, 0, grab.width, grab.height);
  const capturedUs = BigInt(Date.now()) * 1000n;
  encoding = true;
  grab.toBlob(async (blob) => {
    try {
      if (!blob || !cameraStream) return;
      const jpeg = new Uint8Array(await blob.arrayBuffer());
      const msg = pictureMessage(KIND_CAMERA, cameraFrame++, capturedUs, jpeg);
      if (ws.readyState === WebSocket.OPEN) {
        ws.send(msg);
        state.cameraSent++;
        sentStamps.add(Number(capturedUs));
        if (sentStamps.size > 300) sentStamps.delete(sentStamps.values().next().value);
      }
    } finally {
      encoding = false;
    }
  }, "image/jpeg", CAMERA_JPEG_QUALITY);
}

// ---- a caller's page as the source: camera and microphone ----------------------------------

let mediaWanted = false, micStream = null, audioContext = null, pcmFrame = 0;

async function startMedia() {
  await startCamera();
  await startMicrophone();
}

async function startMicrophone() {
  try {
    micStream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true }, video: false,
    });
    audioContext = new AudioContext({ sampleRate: MIC_RATE });
    await audioContext.audioWorklet.addModule("mic-worklet.js");
    const node = new AudioWorkletNode(audioContext, "mic-pcm");
    node.port.onmessage = (ev) => sendPcm(new Int16Array(ev.data));
    audioContext.createMediaStreamSource(micStream).connect(node);
    node.connect(audioContext.destination);  // (it outputs silence; connected so it is pulled)
    micStream.getAudioTracks().forEach((t) => { t.enabled = !state.muted.microphone; });
    if (audioContext.state === "suspended") {
      // browsers start sound only after a gesture on the page
      $("controls-note").textContent = "Click anywhere on the page to send your microphone.";
      $("controls-note").hidden = false;
      document.addEventListener("click", () => {
        audioContext.resume();
        $("controls-note").hidden = true;
      }, { once: true });
    }
  } catch (err) {
    $("camera-note").textContent += ` No microphone: ${err.message || err.name}; the call goes on without sound.`;
  }
}

function sendPcm(samples) {
  // (a chunk may still come from the audio thread after stopMedia)
  if (state.muted.microphone || !audioContext || !ws || ws.readyState !== WebSocket.OPEN) return;
  // payload: sample rate (u32 BE), then int16 little-endian samples
  const payload = new Uint8Array(4 + samples.length * 2);
  const view = new DataView(payload.buffer);
  view.setUint32(0, audioContext.sampleRate);
  for (let i = 0; i < samples.length; i++) view.setInt16(4 + 2 * i, samples[i], true);
  ws.send(pictureMessage(KIND_AUDIO, pcmFrame++, BigInt(Date.now()) * 1000n, payload));
  state.pcmSent++;
}

function stopMicrophone() {
  micStream?.getTracks().forEach((t) => t.stop());
  micStream = null;
  audioContext?.close().catch(() => {});
  audioContext = null;
}

function stopMedia() {
  stopCamera(false);
  stopMicrophone();
}

// ---- start ------------------------------------------------------------------------------

$("camera").addEventListener("click", () => (cameraStream ? stopCamera() : startCamera()));
$("bitrate").addEventListener("change", askBitrate);
$("hangup").addEventListener("click", hangUp);
$("mute-camera").addEventListener("click", () => toggleMute("camera"));
$("mute-mic").addEventListener("click", () => toggleMute("microphone"));
$("camera-mic").addEventListener("click", toggleViewerMic);
$("fullscreen").addEventListener("click", toggleFullscreen);
$("fs-exit").addEventListener("click", toggleFullscreen);
$("fs-hangup").addEventListener("click", hangUp);
$("decoded").addEventListener("dblclick", () => { if (face) toggleFullscreen(); });
$("compare").addEventListener("change", () => {
  $("original-box").hidden = !$("compare").checked || state.drawn[KIND_ORIGINAL] === 0;
  if ($("compare").checked && state.shownFrame !== null) drawOriginal(state.shownFrame);
});
renderStats();
drawChart();

if (room && token && PROGRAM_LINKS[linkRole]) {
  // Never join a seat of the call from a page: that link belongs to a program.
  $("call").hidden = true;
  const page = linkRole === "caller" ? "; it prints this person's page link" : "; in a browser open the viewers' link";
  setStatus(`this is the ${linkRole}'s link: use it with python -m ${PROGRAM_LINKS[linkRole]} ` +
            `--url '…'${page}`, "error");
} else if (room && token && face && !/^[0-9a-f]{8}$/.test(faceOf || "")) {
  $("call").hidden = true;
  setStatus("this page link lacks its peer= (the link streamer.call printed has it)", "error");
} else if (room && token) {
  $("room").textContent = room;
  $("room").hidden = false;
  if (face) {
    $("controls").hidden = false;
    $("camera-row").hidden = true;
    $("bitrate-label").textContent = "your picture's bitrate";
  }
  labelPictures();
  connect();
} else {
  $("call").hidden = true;
  $("join-form").hidden = false;
  setStatus("not joined");
}
