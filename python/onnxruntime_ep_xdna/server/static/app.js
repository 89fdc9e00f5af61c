// The page of `xdna serve`: pick, drop or record audio, stream the transcription from this server's own
// OpenAI-compatible endpoint (server-sent events), show segments as they come, offer txt/srt/vtt/json.
// Nothing is loaded from anywhere else.
"use strict";

const $ = (id) => document.getElementById(id);
let audio = null;        // {blob, name}
let formats = null;      // the finished transcription's files, from the server's own writers
let health = null;
let busy = false;

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function stamp(s) {
  const ms = Math.round(s * 1000);
  const h = Math.floor(ms / 3600000), m = Math.floor(ms / 60000) % 60, sec = Math.floor(ms / 1000) % 60;
  const pad = (n, w) => String(n).padStart(w, "0");
  return (h ? pad(h, 2) + ":" : "") + pad(m, 2) + ":" + pad(sec, 2) + "." + pad(ms % 1000, 3);
}

function backendLine(h) {
  if (h.backend === "cpu") return "CPU execution provider (--provider cpu)";
  if (h.backend === "emulator") return "XDNA EP on the emulator (no NPU here; the NPU's bf16 contract on the CPU)";
  if (h.backend === "npu" || h.backend === "xrt") return "XDNA EP on the NPU";
  return "XDNA EP, backend " + h.backend;
}

async function loadHealth() {
  try {
    const r = await fetch("/health");
    health = await r.json();
    $("where").textContent = "Model " + health.model + " — runs on " + backendLine(health) + ".";
    $("where").title = health.backend_reason || "";
    $("key-label").hidden = !health.auth_required;
    const sel = $("language");
    for (const code of health.languages || []) {
      const o = document.createElement("option");
      o.value = code; o.textContent = code;
      sel.appendChild(o);
    }
    if (!health.multilingual) {
      $("task").querySelector('[value="translate"]').disabled = true;
    }
  } catch (e) {
    $("where").textContent = "The server does not answer (" + e + ").";
  }
}

function choose(blob, name) {
  audio = { blob, name };
  $("go").disabled = busy;
  setStatus("Ready: " + name + " (" + (blob.size / 1048576).toFixed(2) + " MB)");
}

$("file").addEventListener("change", (ev) => {
  const f = ev.target.files[0];
  if (f) choose(f, f.name);
});
const drop = $("drop");
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (ev) => {
  ev.preventDefault();
  drop.classList.remove("over");
  const f = ev.dataTransfer.files[0];
  if (f) choose(f, f.name);
});

// ---- microphone: MediaRecorder, then 16 kHz mono WAV made here (the server needs no ffmpeg for it) ----------
let recorder = null;
$("record").addEventListener("click", async () => {
  if (recorder) { recorder.stop(); return; }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    setStatus("No microphone: " + e.message, true);
    return;
  }
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (ev) => { if (ev.data.size) chunks.push(ev.data); };
  recorder.onstop = async () => {
    stream.getTracks().forEach((t) => t.stop());
    recorder = null;
    $("record").classList.remove("on");
    $("record").textContent = "● Record from the microphone";
    $("rec-status").textContent = "";
    try {
      const wav = await toWav16k(new Blob(chunks, { type: chunks[0] ? chunks[0].type : "audio/webm" }));
      choose(wav, "recording.wav");
    } catch (e) {
      setStatus("Could not read the recording: " + e.message, true);
    }
  };
  recorder.start();
  $("record").classList.add("on");
  $("record").textContent = "■ Stop recording";
  $("rec-status").textContent = "recording…";
});

async function toWav16k(blob) {
  const ctx = new AudioContext();
  const decoded = await ctx.decodeAudioData(await blob.arrayBuffer());
  ctx.close();
  const rate = 16000;
  const off = new OfflineAudioContext(1, Math.max(1, Math.ceil(decoded.duration * rate)), rate);
  const src = off.createBufferSource();
  src.buffer = decoded;
  src.connect(off.destination);
  src.start();
  const pcm = (await off.startRendering()).getChannelData(0);
  const buf = new ArrayBuffer(44 + pcm.length * 2);
  const v = new DataView(buf);
  const str = (o, s) => { for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i)); };
  str(0, "RIFF"); v.setUint32(4, 36 + pcm.length * 2, true); str(8, "WAVE"); str(12, "fmt ");
  v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true); v.setUint32(24, rate, true);
  v.setUint32(28, rate * 2, true); v.setUint16(32, 2, true); v.setUint16(34, 16, true); str(36, "data");
  v.setUint32(40, pcm.length * 2, true);
  for (let i = 0; i < pcm.length; i++) v.setInt16(44 + 2 * i, Math.max(-1, Math.min(1, pcm[i])) * 32767, true);
  return new Blob([buf], { type: "audio/wav" });
}

// ---- transcription ----------------------------------------------------------------------------------------------
function addSegment(seg) {
  const row = document.createElement("div");
  row.className = "seg";
  const ts = document.createElement("span");
  ts.className = "ts";
  ts.textContent = "[" + stamp(seg.start) + " → " + stamp(seg.end) + "]";
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = seg.text.trim();
  row.append(ts, text);
  $("transcript").appendChild(row);
}

function showView() {
  const view = $("view").value;
  const plain = view !== "segments" && formats;
  $("transcript").hidden = !!plain;
  $("plain").hidden = !plain;
  if (plain) $("plain").textContent = formats[view];
}
$("view").addEventListener("change", showView);

$("go").addEventListener("click", async () => {
  if (!audio || busy) return;
  busy = true;
  $("go").disabled = true;
  formats = null;
  $("transcript").textContent = "";
  $("plain").textContent = "";
  $("ran").textContent = "";
  $("result").hidden = false;
  $("transcript").hidden = false;
  $("plain").hidden = true;
  const bar = $("progress");
  bar.hidden = false;
  bar.removeAttribute("value");  // indeterminate until the first segment
  setStatus("Uploading " + audio.name + "…");
  const task = $("task").value;
  const body = new FormData();
  body.append("file", audio.blob, audio.name);
  body.append("response_format", "json");
  body.append("stream", "true");
  if ($("language").value) body.append("language", $("language").value);
  const headers = {};
  if ($("api-key").value) headers["Authorization"] = "Bearer " + $("api-key").value;
  const t0 = performance.now();
  try {
    const r = await fetch(task === "translate" ? "/v1/audio/translations" : "/v1/audio/transcriptions",
                          { method: "POST", body, headers });
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { msg = (await r.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    setStatus(task === "translate" ? "Translating…" : "Transcribing…");
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    let finished = false;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (!data) continue;
        const ev = JSON.parse(data);
        if (ev.error) throw new Error(ev.error.message);
        if (ev.type === "transcript.text.delta") {
          addSegment(ev.segment);
          if (ev.progress !== undefined) bar.value = ev.progress;
          setStatus("Transcribing… " + stamp(ev.segment.end));
        } else if (ev.type === "transcript.text.done") {
          finished = true;
          formats = ev.formats;
          const x = ev.x_xdna || {};
          bar.value = 1;
          setStatus("Done: " + ev.duration.toFixed(1) + " s of audio" +
                    (ev.language ? ", language " + ev.language : "") +
                    (ev.segments.length ? "" : " — no speech found"));
          $("ran").textContent = "Ran on " + backendLine(health || x) + ": " + x.processing_s.toFixed(2) +
            " s for " + ev.duration.toFixed(1) + " s of audio, RTF " + (x.rtf === null ? "n/a" : x.rtf.toFixed(3)) +
            " (round trip " + ((performance.now() - t0) / 1000).toFixed(2) + " s).";
          $("result").dataset.done = "1";
          showView();
        }
      }
    }
    if (!finished) throw new Error("the server closed the stream before the end");
  } catch (e) {
    setStatus("Error: " + e.message, true);
    bar.hidden = true;
  } finally {
    busy = false;
    $("go").disabled = !audio;
  }
});

document.querySelectorAll(".downloads button").forEach((b) => b.addEventListener("click", () => {
  if (!formats) return;
  const fmt = b.dataset.fmt;
  const type = fmt === "json" ? "application/json" : "text/plain";
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([formats[fmt]], { type: type + ";charset=utf-8" }));
  a.download = (audio ? audio.name.replace(/\.[^.]*$/, "") : "transcript") + "." + fmt;
  document.body.appendChild(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}));

loadHealth();
