// titan-world browser client: draws JPEG frames from /ws on a canvas, sends WASD + mouse.
// State is exposed as window.titan for debugging and the headless-browser test.
"use strict";
(() => {
  const KEYMAP = { KeyW: "w", KeyA: "a", KeyS: "s", KeyD: "d", Space: "space", ShiftLeft: "shift", ShiftRight: "shift" };
  const PIXELS_PER_UNIT = 40;   // mouse pixels per normalised unit (1.0 = max turn per frame)
  const SEND_EVERY_MS = 33;     // at most ~30 action messages per second
  const canvas = document.getElementById("view");
  const ctx = canvas.getContext("2d");
  const statsEl = document.getElementById("stats");
  const errorEl = document.getElementById("error");
  const t = (window.titan = { frames: 0, drawn: 0, status: null, started: null, errors: [], keys: new Set(), mouse: [0, 0], ws: null });

  function wsUrl() { return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws"; }

  function connect() {
    const ws = new WebSocket(wsUrl());
    ws.binaryType = "blob";
    t.ws = ws;
    ws.onopen = () => { statsEl.textContent = "connected"; };
    ws.onclose = (ev) => { statsEl.textContent = `disconnected (${ev.code} ${ev.reason || ""})`; t.ws = null; setTimeout(connect, 2000); };
    ws.onmessage = (ev) => {
      if (typeof ev.data !== "string") { t.frames++; draw(ev.data); return; }
      const msg = JSON.parse(ev.data);
      if (msg.type === "error") { t.errors.push(msg.message); errorEl.textContent = msg.message; }
      else if (msg.type === "started") {
        t.started = msg; errorEl.textContent = "";
        canvas.width = msg.width; canvas.height = msg.height;
      } else if (msg.type === "status") { t.status = msg; showStats(msg); }
    };
  }

  let drawing = false, pending = null;
  async function draw(blob) {
    if (drawing) { pending = blob; return; }   // keep only the newest frame if decode falls behind
    drawing = true;
    try {
      const bmp = await createImageBitmap(blob);
      ctx.drawImage(bmp, 0, 0, canvas.width, canvas.height);
      bmp.close();
      t.drawn++;
    } catch (e) { t.errors.push("draw: " + e); }
    drawing = false;
    if (pending) { const b = pending; pending = null; draw(b); }
  }

  function showStats(s) {
    if (s.state === "queued") { statsEl.textContent = `queued: position ${s.position} of ${s.queue}`; return; }
    if (s.fps === undefined) return;
    const st = s.stages_ms || {};
    statsEl.textContent =
      `fps ${s.fps.toFixed(1)}   latency ${s.latency_ms.toFixed(0)} ms   queue ${s.queue}\n` +
      `denoise ${(st.denoise_ms || 0).toFixed(1)}  kv ${(st.kv_refresh_ms || 0).toFixed(1)}  ` +
      `decode ${(st.decode_ms || 0).toFixed(1)}  jpeg ${(st.jpeg_ms || 0).toFixed(1)} ms\nchunk ${s.chunk}  frames ${t.frames}`;
  }

  function send(obj) { if (t.ws && t.ws.readyState === WebSocket.OPEN) t.ws.send(JSON.stringify(obj)); }

  let lastSent = 0, dirty = false;
  function sendAction(force) {
    const now = performance.now();
    if (!force && now - lastSent < SEND_EVERY_MS) { dirty = true; return; }
    send({ type: "action", keys: [...t.keys], mouse: [t.mouse[0] / PIXELS_PER_UNIT, t.mouse[1] / PIXELS_PER_UNIT] });
    t.mouse = [0, 0]; lastSent = now; dirty = false;
  }
  setInterval(() => { if (dirty) sendAction(true); }, SEND_EVERY_MS);

  function showKeys() {
    for (const el of document.querySelectorAll("#keys span")) el.classList.toggle("on", t.keys.has(el.dataset.k));
  }
  function onKey(ev, down) {
    if (document.activeElement && document.activeElement.tagName === "INPUT") return;  // typing a prompt
    const k = KEYMAP[ev.code];
    if (!k) return;
    ev.preventDefault();
    const had = t.keys.has(k);
    if (down) t.keys.add(k); else t.keys.delete(k);
    if (had !== down) { showKeys(); if (t.started) sendAction(true); }
  }
  window.addEventListener("keydown", (e) => onKey(e, true));
  window.addEventListener("keyup", (e) => onKey(e, false));
  window.addEventListener("blur", () => { t.keys.clear(); showKeys(); if (t.started) sendAction(true); });

  canvas.addEventListener("click", () => { if (canvas.requestPointerLock) canvas.requestPointerLock(); });
  document.addEventListener("pointerlockchange", () => canvas.classList.toggle("locked", document.pointerLockElement === canvas));
  document.addEventListener("mousemove", (e) => {
    if (document.pointerLockElement !== canvas || !t.started) return;
    t.mouse[0] += e.movementX; t.mouse[1] += e.movementY;
    sendAction(false);
  });

  function readImage() {
    const f = document.getElementById("image").files[0];
    if (!f) return Promise.resolve(null);
    return new Promise((resolve, reject) => {
      const r = new FileReader();
      r.onload = () => resolve(r.result);  // a data: URL; the server strips the prefix
      r.onerror = () => reject(r.error);
      r.readAsDataURL(f);
    });
  }
  document.getElementById("start").addEventListener("click", async () => {
    const msg = { type: "start", prompt: document.getElementById("prompt").value };
    const img = await readImage();
    if (img) msg.image = img;
    t.started = null; send(msg);
  });
  document.getElementById("setprompt").addEventListener("click", () => send({ type: "prompt", text: document.getElementById("prompt").value }));
  document.getElementById("reset").addEventListener("click", () => send({ type: "reset" }));
  // What a start without image or prompt begins from (e.g. the synthetic world a model was trained
  // on): shown in the view and the prompt box before Start.
  async function showStartDefaults() {
    try {
      const d = await (await fetch("/start")).json();
      t.startDefaults = d;
      const promptEl = document.getElementById("prompt");
      if (!promptEl.value) promptEl.value = d.prompt;
      if (!d.image || t.started) return;
      const bmp = await createImageBitmap(await (await fetch(d.image)).blob());
      if (!t.started && t.frames === 0) {
        canvas.width = bmp.width; canvas.height = bmp.height;
        ctx.drawImage(bmp, 0, 0);
        t.startShown = true;
      }
      bmp.close();
    } catch (e) { t.errors.push(`start defaults: ${e}`); }
  }
  t.send = send;
  showStartDefaults();
  connect();
})();
