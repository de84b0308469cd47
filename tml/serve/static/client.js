// tml serve browser client: protocol v1 (tml/serve/protocol.py).
// Microphone -> AudioWorklet (16 kHz PCM16, 200 ms chunks) -> AUDIO frames; the server's
// MODEL_AUDIO is played back in order, MODEL_TEXT goes to the transcript, every TICK adds a
// column to the timeline (user / model speaking / camera). The optional camera is sampled
// every 100 ms (10 fps, the model's video rate) into a small JPEG; the (at most two) frames
// taken since the last chunk are sent as VIDEO right before that chunk's AUDIO frame, so
// they are its micro-turn's frame pair. window.tmlStats holds the counters.
const K = { HANDSHAKE: 0x00, AUDIO: 0x01, VIDEO: 0x02, TEXT: 0x03, CONTROL: 0x04, PING: 0x05,
            SERVER_HANDSHAKE: 0x10, MODEL_AUDIO: 0x11, MODEL_TEXT: 0x12, MODEL_EVENT: 0x13, TICK: 0x14,
            ERROR: 0x15, PONG: 0x16 };
const VERSION = 1, RATE = 16000;
const stats = window.tmlStats = { chunksSent: 0, ticks: 0, modelAudio: 0, modelText: 0, events: 0, errors: 0,
                                  videoFramesSent: 0, videoTicks: 0, camera: "off",
                                  session: null, lastError: null, errorCodes: {}, state: "idle" };
const enc = new TextEncoder(), dec = new TextDecoder();
const FRAME_MS = 100, FRAMES_PER_TURN = 2, FRAME_W = 160, FRAME_H = 120, JPEG_QUALITY = 0.7;
let ws = null, ctx = null, playAt = 0;
let cam = null, camTimer = null, camFrames = [];   // camFrames: JPEG ArrayBuffers of the next micro-turn
const userLevels = [];   // RMS of each chunk sent, in order

function $(id) { return document.getElementById(id); }
function setState(s) { stats.state = s; $("state").textContent = s; }

function frame(kind, payload) {
  const body = typeof payload === "string" ? enc.encode(payload) : new Uint8Array(payload);
  const out = new Uint8Array(1 + body.length);
  out[0] = kind; out.set(body, 1);
  return out.buffer;
}

function timelineCell(user, model, video) {
  const col = document.createElement("div");
  col.className = "col";
  col.innerHTML = `<div class="cell ${user ? "user" : ""}"></div><div class="cell ${model ? "model" : ""}"></div>` +
                  `<div class="cell thin ${video ? "video" : ""}"></div>`;
  const tl = $("timeline");
  tl.appendChild(col);
  tl.scrollLeft = tl.scrollWidth;
}

function transcript(who, text) {
  const t = $("transcript");
  let last = t.lastElementChild;
  if (!last || last.dataset.who !== who) {
    last = document.createElement("p");
    last.dataset.who = who;
    last.className = "entry " + who;
    last.innerHTML = `<b>${who}:</b> <span></span>`;
    t.appendChild(last);
  }
  last.querySelector("span").textContent += text;
  t.scrollTop = t.scrollHeight;
}

function play(pcm16) {
  const n = pcm16.length;
  if (!n) return;
  const buf = ctx.createBuffer(1, n, RATE);
  const ch = buf.getChannelData(0);
  for (let i = 0; i < n; i++) ch[i] = pcm16[i] / 32768;
  const src = ctx.createBufferSource();
  src.buffer = buf;
  src.connect(ctx.destination);
  playAt = Math.max(playAt, ctx.currentTime + 0.05);
  src.start(playAt);
  playAt += n / RATE;
}

function onMessage(ev) {
  const data = new Uint8Array(ev.data);
  const kind = data[0], body = data.subarray(1);
  const dv = new DataView(body.buffer, body.byteOffset, body.byteLength);
  if (kind === K.SERVER_HANDSHAKE) {
    const hs = JSON.parse(dec.decode(body));
    stats.session = hs.session;
    setState(`session ${hs.session}`);
  } else if (kind === K.MODEL_AUDIO) {
    stats.modelAudio++;
    play(new Int16Array(body.slice(4).buffer));
  } else if (kind === K.MODEL_TEXT) {
    stats.modelText++;
    transcript("model", dec.decode(body.subarray(4)));
  } else if (kind === K.MODEL_EVENT) {
    stats.events++;
    const e = JSON.parse(dec.decode(body));
    if (e.event === "control") transcript("model", ` [${e.actions.join(" ")}] `);
  } else if (kind === K.TICK) {
    const t = JSON.parse(dec.decode(body));
    stats.ticks++;
    const level = userLevels[t.micro_turn] || 0;
    if (t.video) stats.videoTicks++;
    timelineCell(level > 0.01, t.speaking, t.video > 0);
    $("timing").textContent = `micro-turn ${t.micro_turn} · engine ${t.engine_ms.toFixed(1)} ms · ` +
                              `queued ${t.queue_ms.toFixed(1)} ms · batch ${t.batch}`;
  } else if (kind === K.ERROR) {
    stats.errors++;
    const e = JSON.parse(dec.decode(body));
    stats.lastError = e;
    stats.errorCodes[e.code] = (stats.errorCodes[e.code] || 0) + 1;
    $("errors").textContent = `${e.code}: ${e.message}`;
  }
}

async function start() {
  $("start").disabled = true;
  setState("starting");
  const params = new URLSearchParams(location.search);
  const token = params.get("token") || "";
  ctx = new AudioContext();
  await ctx.audioWorklet.addModule("/static/capture-worklet.js");
  const mic = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
  const source = ctx.createMediaStreamSource(mic);
  const node = new AudioWorkletNode(ctx, "tml-capture");
  source.connect(node);   // not to the destination: no echo of the microphone
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws` +
              (token ? `?token=${encodeURIComponent(token)}` : "");
  ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  ws.onmessage = onMessage;
  ws.onclose = (e) => setState(`closed (${e.code})`);
  await new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = fail; });
  ws.send(frame(K.HANDSHAKE, JSON.stringify({ version: VERSION, seed: Number(params.get("seed") || 0),
                                              context: $("context").value })));
  node.port.onmessage = (m) => {
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    const pcm = new Int16Array(m.data);
    let s = 0;
    for (let i = 0; i < pcm.length; i++) s += (pcm[i] / 32768) ** 2;
    userLevels.push(Math.sqrt(s / pcm.length));
    for (const jpeg of camFrames.splice(0)) {    // this micro-turn's frame pair, before its chunk
      ws.send(frame(K.VIDEO, jpeg));
      stats.videoFramesSent++;
    }
    ws.send(frame(K.AUDIO, m.data));
    stats.chunksSent++;
  };
  $("stop").disabled = false;
}

async function cameraOn() {
  cam = await navigator.mediaDevices.getUserMedia({ video: { width: 320, height: 240, frameRate: 10 } });
  const video = $("preview");
  video.srcObject = cam;
  await video.play();
  const canvas = document.createElement("canvas");
  canvas.width = FRAME_W; canvas.height = FRAME_H;
  const g = canvas.getContext("2d");
  camTimer = setInterval(() => {
    if (!video.videoWidth) return;
    g.drawImage(video, 0, 0, FRAME_W, FRAME_H);
    canvas.toBlob((blob) => {
      if (!blob || !camTimer) return;
      blob.arrayBuffer().then((buf) => {
        camFrames.push(buf);
        if (camFrames.length > FRAMES_PER_TURN) camFrames.shift();   // keep the newest pair
      });
    }, "image/jpeg", JPEG_QUALITY);
  }, FRAME_MS);
  stats.camera = "on";
  $("camera").textContent = "Camera off";
}

function cameraOff() {
  clearInterval(camTimer);
  camTimer = null;
  camFrames = [];
  if (cam) cam.getTracks().forEach((t) => t.stop());
  cam = null;
  $("preview").srcObject = null;
  stats.camera = "off";
  $("camera").textContent = "Camera on";
}

function toggleCamera() {
  if (cam) cameraOff();
  else cameraOn().catch((e) => { stats.camera = "error: " + e; $("errors").textContent = "camera: " + e; });
}

function stop() {
  cameraOff();
  if (ws) ws.close(1000);
  if (ctx) ctx.close();
  ws = null;
  $("stop").disabled = true;
  $("start").disabled = false;
}

function sendTyped() {
  const box = $("typed");
  if (ws && box.value) {
    ws.send(frame(K.TEXT, box.value));
    transcript("you (typed)", box.value + " ");
    box.value = "";
  }
}

window.addEventListener("load", () => {
  $("start").onclick = () => start().catch((e) => { setState("error: " + e); $("start").disabled = false; });
  $("stop").onclick = stop;
  $("send").onclick = sendTyped;
  $("camera").onclick = toggleCamera;
  const params = new URLSearchParams(location.search);
  if (params.get("camera") === "1") toggleCamera();
  if (params.get("autostart") === "1") $("start").click();
});
