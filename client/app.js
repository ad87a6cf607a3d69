// Browser client of the neural video call (protocol: docs/protocol.md).
// Joins a room as a viewer, draws the decoded (kind 1) and original (kind 2) pictures, shows
// both ends' stats with a small chart, and can send this browser's webcam as kind-3 frames.
// The link's token decides what the page may do: the viewers' link only watches, the camera
// link may also feed the sender and change the call's bitrate target (the sender's --kbps).
// The sender's and receiver's links are for the programs.
"use strict";

const KIND_DECODED = 1, KIND_ORIGINAL = 2, KIND_CAMERA = 3;
const HEADER_BYTES = 13;
const CAMERA_FPS = 20;
const CAMERA_MAX_WIDTH = 640;
const CAMERA_JPEG_QUALITY = 0.8;
const MAX_BUFFERED = 256 * 1024;   // don't queue a camera frame behind this much unsent data
const CHART_SECONDS = 60;
const FATAL_CLOSE = new Set([1008, 1009, 4000]);  // refused or replaced: retrying won't help
const BITRATE_ANSWER_MS = 5000;    // say so when the sender has not answered by then

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const room = params.get("room"), token = params.get("token");
const linkRole = params.get("role") || "viewer";  // which of the server's links this is
const PROGRAM_LINKS = { sender: "streamer.send", receiver: "streamer.receive" };

// Counters the page shows (and tests read).
const state = window.callState = {
  joined: false,
  peerId: null,
  maySendCamera: false,       // the camera link's token lets this page feed the call
  maySetBitrate: false,       // ... and change the sender's bitrate target
  bitrate: { asked: null, answer: null },  // kbps awaiting an answer; the sender's last answer
  peers: new Map(),           // peer_id → role
  drawn: { [KIND_DECODED]: 0, [KIND_ORIGINAL]: 0 },
  cameraSent: 0,
  cameraEchoes: 0,            // decoded pictures that were this page's camera frames
  stats: { sender: {}, receiver: {}, page: {} },   // as received
  view: { sender: {}, receiver: {}, page: {} },    // numbers as shown
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
    ws.send(JSON.stringify({ type: "join", room, token, role: "viewer", name: "browser" }));
  };
  ws.onmessage = (ev) => {
    if (typeof ev.data === "string") onControl(JSON.parse(ev.data));
    else onPicture(ev.data);
  };
  ws.onclose = (ev) => {
    state.joined = false;
    stopCamera(false);
    state.peers.clear();
    showPeers();
    if (FATAL_CLOSE.has(ev.code)) return;  // the error message already explains it
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
      setStatus("joined — waiting for pictures", "live");
      break;
    case "peer_joined":
      state.peers.set(msg.peer_id, msg.role);
      showPeers();
      break;
    case "peer_left":
      state.peers.delete(msg.peer_id);
      showPeers();
      break;
    case "stats":
      if (msg.from_role !== "sender" && msg.from_role !== "receiver") break;
      state.stats[msg.from_role] = msg.stats || {};
      state.view[msg.from_role] = normalize(msg.from_role, msg.stats || {});
      renderStats();
      if (msg.from_role === "sender") showBitrateNow();
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
      else setStatus(`${msg.code}: ${msg.message}`, "error");
      break;
  }
}

function showCameraRight() {
  $("camera").disabled = !state.maySendCamera;
  $("camera-note").textContent = state.maySendCamera ? "" :
    "This link only watches. The camera link the server printed may feed the call.";
}

function showPeers() {
  const roles = new Set(state.peers.values());
  for (const role of ["sender", "receiver"]) {
    $("peer-" + role).classList.toggle("present", roles.has(role));
  }
}

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
  bitrateNote(`asking the sender for ${kbps} kbps…`);
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

// The sender's stats: the target it holds (lowered while the channel is congested) and what it
// sent; without target_kbps it codes at a fixed level.
function showBitrateNow() {
  const tx = state.view.sender;
  const sent = typeof tx.kbps === "number" ? ` · sent ${tx.kbps.toFixed(0)} kbps` : "";
  if (typeof tx.target_kbps === "number") {
    $("bitrate-now").textContent = `target ${tx.target_kbps.toFixed(0)} kbps${sent}`;
    if (!bitrateFromStats) selectBitrate(Math.round(tx.target_kbps));  // the sender's own start
    bitrateFromStats = true;
  } else {
    $("bitrate-now").textContent = `fixed level, no rate control${sent}`;
  }
}

// ---- pictures ---------------------------------------------------------------------------

// One decode per kind at a time; a picture that arrives meanwhile replaces the waiting one, so
// a slow machine shows fewer, but always recent, frames.
const pending = new Map(), decoding = new Set();
let framesThisSecond = 0, latencyMs = null;

function onPicture(buf) {
  if (buf.byteLength < HEADER_BYTES) return;
  const view = new DataView(buf);
  const kind = view.getUint8(0);
  if (kind !== KIND_DECODED && kind !== KIND_ORIGINAL) return;
  pending.set(kind, {
    frame: view.getUint32(1),
    timestampUs: Number(view.getBigUint64(5)),
    blob: new Blob([new Uint8Array(buf, HEADER_BYTES)], { type: "image/jpeg" }),
  });
  if (!decoding.has(kind)) drawNext(kind);
}

async function drawNext(kind) {
  const pic = pending.get(kind);
  if (!pic) return;
  pending.delete(kind);
  decoding.add(kind);
  try {
    const bitmap = await createImageBitmap(pic.blob);
    const canvas = $(kind === KIND_DECODED ? "decoded" : "original");
    if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
      canvas.width = bitmap.width;
      canvas.height = bitmap.height;
    }
    canvas.getContext("2d").drawImage(bitmap, 0, 0);
    const size = `${bitmap.width}×${bitmap.height}`;
    bitmap.close();
    state.drawn[kind]++;
    if (kind === KIND_DECODED) {
      framesThisSecond++;
      // Timestamps are epoch µs: meaningful when sender and browser share a clock.
      const ms = Date.now() - pic.timestampUs / 1000;
      // The sender keeps our capture time, so this picture may be our own camera frame.
      if (sentStamps.delete(pic.timestampUs)) state.cameraEchoes++;
      latencyMs = ms >= 0 && ms < 60000 ? ms : null;
      $("decoded-info").textContent = `#${pic.frame} · ${size}`;
      setStatus("live", "live");
    } else {
      $("original-box").hidden = false;
      $("original-info").textContent = `#${pic.frame}`;
    }
  } catch (err) {
    console.warn("undecodable picture", err);
  } finally {
    decoding.delete(kind);
    if (pending.has(kind)) drawNext(kind);
  }
}

// ---- stats -----------------------------------------------------------------------------

const ROWS = [
  ["fps", "fps", 1], ["kbps", "kbps", 0], ["latency_ms", "latency ms", 0],
  ["psnr", "PSNR dB", 1], ["loss", "loss %", 1],
];
const HIDDEN_KEYS = new Set(["t"]);
const previous = { sender: null, receiver: null };

// Stats are free-form: latency may be a number or {p50, p95, max}; loss may come as a fraction
// (`loss`) or as running totals (`lost` next to `frames`), turned here into a per-update rate.
function normalize(role, stats) {
  const out = {};
  for (const [k, v] of Object.entries(stats)) {
    if (typeof v === "number" && isFinite(v)) out[k] = v;
    else if (v && typeof v === "object" && typeof v.p50 === "number") out[k] = v.p50;
  }
  if (out.loss === undefined && typeof out.lost === "number" && typeof out.frames === "number") {
    const prev = previous[role];
    if (prev) {
      const lost = out.lost - prev.lost, shown = out.frames - prev.frames;
      if (lost >= 0 && shown >= 0 && lost + shown > 0) out.loss = lost / (lost + shown);
      else if (lost >= 0 && shown >= 0) out.loss = 0;
    }
    previous[role] = { lost: out.lost, frames: out.frames };
  }
  return out;
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

// Once a second: this page's own fps/latency, and one chart sample.
const history = [];
setInterval(() => {
  state.view.page = { fps: framesThisSecond, latency_ms: latencyMs ?? undefined };
  if (framesThisSecond === 0 && $("status").textContent === "live") {
    setStatus("joined — waiting for pictures", "live");  // the call paused or ended
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

function drawChart() {
  const canvas = $("chart"), ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 18;
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#2c313a";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = pad + ((h - 2 * pad) * i) / 4;
    ctx.beginPath(); ctx.moveTo(0, y); ctx.lineTo(w, y); ctx.stroke();
  }
  const series = [["kbps", "#4f9dff", 4], ["latency", "#ffb454", w - 4]];
  ctx.font = "11px system-ui, sans-serif";
  for (const [key, color, labelX] of series) {
    const values = history.map((s) => s[key]);
    const max = Math.max(1, ...values.filter((v) => v !== null));
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    let started = false;
    values.forEach((v, i) => {
      if (v === null) { started = false; return; }
      const x = (w * i) / (CHART_SECONDS - 1);
      const y = h - pad - ((h - 2 * pad) * v) / max;
      if (started) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      started = true;
    });
    ctx.stroke();
    // Each line has its own scale: label its maximum at its side.
    ctx.fillStyle = color;
    ctx.textAlign = labelX < w / 2 ? "left" : "right";
    ctx.fillText(`max ${max.toFixed(0)}`, labelX, 12);
  }
}

// ---- camera -----------------------------------------------------------------------------

let cameraStream = null, cameraTimer = null, encoding = false, cameraFrame = 0;
const sentStamps = new Set();  // capture times (µs) of recent camera frames we sent
const grab = document.createElement("canvas");

async function startCamera() {
  if (!navigator.mediaDevices?.getUserMedia) {
    $("camera-note").textContent = "This browser gives no camera here (it needs http://localhost or https).";
    return;
  }
  try {
    cameraStream = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 30 } },
      audio: false,
    });
  } catch (err) {
    $("camera-note").textContent = `No camera: ${err.message || err.name}`;
    return;
  }
  const preview = $("preview");
  preview.srcObject = cameraStream;
  preview.hidden = false;
  await preview.play().catch(() => {});
  send({ type: "camera", on: true });
  cameraTimer = setInterval(sendCameraFrame, 1000 / CAMERA_FPS);
  $("camera").textContent = "Stop my camera";
  $("camera").setAttribute("aria-pressed", "true");
  $("camera-note").textContent = "Your camera feeds the call's sender.";
}

function stopCamera(tellServer = true) {
  if (!cameraStream) return;
  clearInterval(cameraTimer);
  cameraStream.getTracks().forEach((t) => t.stop());
  cameraStream = null;
  $("preview").hidden = true;
  $("preview").srcObject = null;
  if (tellServer) send({ type: "camera", on: false });
  $("camera").textContent = "Send my camera";
  $("camera").setAttribute("aria-pressed", "false");
  $("camera-note").textContent = "";
}

function sendCameraFrame() {
  const video = $("preview");
  // Latest-only: skip this tick while a frame is being encoded or the socket is backed up.
  if (encoding || !ws || ws.readyState !== WebSocket.OPEN || ws.bufferedAmount > MAX_BUFFERED) return;
  if (!video.videoWidth) return;
  const scale = Math.min(1, CAMERA_MAX_WIDTH / video.videoWidth);
  grab.width = Math.round(video.videoWidth * scale);
  grab.height = Math.round(video.videoHeight * scale);
  grab.getContext("2d").drawImage(video, 0, 0, grab.width, grab.height);
  const capturedUs = BigInt(Date.now()) * 1000n;
  encoding = true;
  grab.toBlob(async (blob) => {
    try {
      if (!blob || !cameraStream) return;
      const jpeg = new Uint8Array(await blob.arrayBuffer());
      const msg = new Uint8Array(HEADER_BYTES + jpeg.length);
      const view = new DataView(msg.buffer);
      view.setUint8(0, KIND_CAMERA);
      view.setUint32(1, cameraFrame++ >>> 0);
      view.setBigUint64(5, capturedUs);
      msg.set(jpeg, HEADER_BYTES);
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

// ---- start ------------------------------------------------------------------------------

$("camera").addEventListener("click", () => (cameraStream ? stopCamera() : startCamera()));
$("bitrate").addEventListener("change", askBitrate);
renderStats();
drawChart();

if (room && token && PROGRAM_LINKS[linkRole]) {
  // Never join a seat of the call from a page: that link belongs to a program.
  $("call").hidden = true;
  setStatus(`this is the ${linkRole}'s link: use it with python -m ${PROGRAM_LINKS[linkRole]} ` +
            "--url '…'; in a browser open the viewers' link", "error");
} else if (room && token) {
  $("room").textContent = room;
  $("room").hidden = false;
  connect();
} else {
  $("call").hidden = true;
  $("join-form").hidden = false;
  setStatus("not joined");
}
