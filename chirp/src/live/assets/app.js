// The live page of `chirp up`: draws the snapshot the server pushes every
// second (server-sent events) and sends the buttons' commands. No build
// step and no dependencies: this file is served as written.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
// Where each part sits: message-service in the middle of its callers,
// each store under (or over) the one service that owns it.
const LAYOUT = {
  "mongodb":           { x: 500, y: 45,  w: 170, h: 56 },
  "message-service":   { x: 500, y: 185, w: 230, h: 96 },
  "user-service":      { x: 135, y: 345, w: 230, h: 96 },
  "comment-service":   { x: 865, y: 345, w: 230, h: 96 },
  "analytics-service": { x: 500, y: 505, w: 230, h: 124 },
  "postgres":          { x: 135, y: 600, w: 170, h: 56 },
  "redis":             { x: 865, y: 600, w: 170, h: 56 },
};
const PARTS = ["postgres", "mongodb", "redis", "user-service", "message-service", "comment-service", "analytics-service"];

const $ = (sel) => document.querySelector(sel);
function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
const fmtRate = (r) => (r >= 10 ? r.toFixed(0) : r.toFixed(1)) + "/s";
const fmtMs = (ms) => (ms == null ? "–" : ms >= 10 ? ms.toFixed(0) + "ms" : ms.toFixed(1) + "ms");
const fmtPct = (e) => (e * 100).toFixed(e > 0 && e < 0.1 ? 1 : 0) + "%";
const circuitText = (e) => (e.circuit && e.circuit !== "closed" ? ` · circuit ${e.circuit}` : "");
const edgeText = (e) => e.state === "idle" ? "idle" + circuitText(e) :
  `${fmtRate(e.rate)} · p99 ${fmtMs(e.p99_ms)} · ${fmtPct(e.error_rate)} err` + circuitText(e);

// The point where the line from a box's centre towards (tx, ty) leaves it.
function border(box, tx, ty) {
  const dx = tx - box.x, dy = ty - box.y;
  const t = Math.min(dx ? (box.w / 2 + 6) / Math.abs(dx) : Infinity, dy ? (box.h / 2 + 6) / Math.abs(dy) : Infinity);
  return [box.x + dx * t, box.y + dy * t];
}

function drawEdges(edges) {
  const group = $("#edges");
  group.replaceChildren();
  for (const e of edges) {
    const a = LAYOUT[e.from], b = LAYOUT[e.to];
    if (!a || !b) continue; // sqlite: drawn inside analytics-service
    // Curved a little to its own side, so A→B and B→A both show.
    const len = Math.hypot(b.x - a.x, b.y - a.y) || 1;
    const nx = -(b.y - a.y) / len, ny = (b.x - a.x) / len;
    const cx = (a.x + b.x) / 2 + nx * 34, cy = (a.y + b.y) / 2 + ny * 34;
    const [sx, sy] = border(a, cx, cy), [ex, ey] = border(b, cx, cy);
    const id = `edge-${e.from}--${e.to}`;
    group.append(el("path", { id, class: "edge", "data-state": e.state, d: `M ${sx} ${sy} Q ${cx} ${cy} ${ex} ${ey}`, "marker-end": "url(#arrow)" }));
    // An idle path needs no numbers (its dashes say it); a broken circuit
    // on one still does.
    if (e.state === "idle" && circuitText(e) === "") continue;
    // On the curve's middle, pushed to its outer side, away from the
    // opposite direction's label.
    const lx = 0.25 * sx + 0.5 * cx + 0.25 * ex + nx * 8, ly = 0.25 * sy + 0.5 * cy + 0.25 * ey + ny * 8;
    const label = el("text", { class: "edge-label", id: `${id}-label`, "data-state": e.state, x: lx, y: ly, "text-anchor": "middle" }, edgeText(e));
    label.append(el("title", {}, `${e.from} → ${e.to}`));
    group.append(label);
  }
}

function drawNodes(nodes, edges) {
  const group = $("#nodes");
  group.replaceChildren();
  for (const n of nodes) {
    const box = LAYOUT[n.id];
    if (!box) continue;
    const g = el("g", { class: "node", id: `node-${n.id}`, "data-healthy": String(n.healthy), "data-process": n.process });
    if (n.api) g.setAttribute("data-api", n.api);
    if (n.store) g.setAttribute("data-store", n.store);
    const left = box.x - box.w / 2 + 12, top = box.y - box.h / 2;
    g.append(el("rect", { class: "box", x: box.x - box.w / 2, y: top, width: box.w, height: box.h }));
    g.append(el("text", { class: "title", x: left, y: top + 21 }, n.id + (n.replicas > 1 ? ` ×${n.replicas}` : "")));
    const rss = n.rss_mib == null ? "" : `${n.rss_mib.toFixed(1)} MiB`;
    if (n.kind === "store") {
      g.append(el("text", { class: n.healthy ? "muted" : "bad", x: left, y: top + 40 }, `${n.healthy ? "up" : "down"} · ${n.process}  ${rss}`));
    } else {
      const line = el("text", { x: left, y: top + 40 });
      line.append(el("tspan", { class: n.api === "SERVING" ? "" : "bad", fill: n.api === "SERVING" ? "#3fb950" : "#f85149" }, `API ${n.api}`));
      line.append(el("tspan", { fill: n.store === "up" ? "#8593a3" : "#f85149" }, ` · store ${n.store ?? "?"}`));
      g.append(line);
      g.append(el("text", { class: "muted", x: left, y: top + 58 }, `${n.process} · RSS ${rss || "–"}`));
      // The totals fit the box; the tooltip has them by destination.
      const sum = (list) => list.reduce((s, [, c]) => s + c, 0);
      const waiting = sum(n.outbox), dead = sum(n.dead_letters);
      const outbox = el("text", { class: dead > 0 ? "bad" : "muted", x: left, y: top + 76 },
        n.outbox.length ? `outbox ${waiting} waiting · ${dead} dead` : "no outbox");
      outbox.append(el("title", {}, n.outbox.map(([d, c]) => `${d}: ${c} waiting`).concat(n.dead_letters.map(([d, c]) => `${d}: ${c} dead`)).join("\n")));
      g.append(outbox);
    }
    if (n.fault) {
      g.append(el("text", { class: "fault", x: box.x + box.w / 2 - 10, y: top + 21, "text-anchor": "end" }, `⚡ ${n.fault}`));
    }
    if (n.id === "analytics-service") {
      // Its SQLite file is inside the process: drawn inside the node.
      const e = edges.find((x) => x.from === "analytics-service" && x.to === "sqlite");
      if (e) {
        g.append(el("rect", { class: "inner", id: "edge-analytics-service--sqlite", "data-state": e.state, x: left - 4, y: top + 88, width: box.w - 16, height: 28 }));
        g.append(el("text", { class: "muted", x: left + 4, y: top + 107 }, `sqlite · ${edgeText(e)}`));
      }
    }
    group.append(g);
  }
}

function drawParts(nodes) {
  const body = $("#parts tbody");
  if (!body.children.length) {
    for (const part of PARTS) {
      const row = document.createElement("tr");
      row.innerHTML = `<td class="name">${part}</td><td class="state" id="state-${part}"></td>`;
      const cell = document.createElement("td");
      for (const [verb, label] of [["stop", "Stop"], ["start", "Start"], ["slow", "Slow"], ["flaky", "Flaky"], ["heal", "Heal"]]) {
        const b = document.createElement("button");
        b.id = `btn-${verb}-${part}`;
        b.textContent = label;
        b.dataset.verb = verb;
        b.dataset.part = part;
        cell.append(b);
      }
      row.append(cell);
      body.append(row);
    }
  }
  for (const n of nodes) {
    const cell = document.getElementById(`state-${n.id}`);
    if (cell) cell.textContent = n.process + (n.fault ? ` · ${n.fault}` : "");
  }
}

function drawRecent(recent, load) {
  $("#load-state").textContent = load ? `traffic at ${load}/s` : "traffic off";
  const button = $("#btn-load");
  button.dataset.running = String(!!load);
  button.textContent = load ? "Stop traffic" : "Start traffic";
  const body = $("#recent tbody");
  body.replaceChildren();
  for (const r of recent) {
    const row = document.createElement("tr");
    row.dataset.rpc = r.rpc;
    row.dataset.at = String(r.at);
    row.dataset.degraded = String(r.degraded);
    row.dataset.failed = String(r.code !== "Ok" && r.code !== "OK");
    if (r.comments) row.dataset.comments = r.comments;
    const cells = [new Date(r.at).toLocaleTimeString(), r.rpc, r.code, r.ms.toFixed(1), r.author ?? "", r.comments ?? "", r.trace_id ? r.trace_id.slice(0, 16) : ""];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 6) { td.className = "trace"; if (r.trace_id) td.title = r.trace_id; }
      row.append(td);
    });
    body.append(row);
  }
}

function render(snapshot) {
  if (!snapshot.nodes) return;
  drawEdges(snapshot.edges);
  drawNodes(snapshot.nodes, snapshot.edges);
  drawParts(snapshot.nodes);
  drawRecent(snapshot.recent, snapshot.load);
  $("#updated").textContent = new Date(snapshot.at).toLocaleTimeString();
  document.body.dataset.at = String(snapshot.at);
}

async function send(command) {
  const message = $("#message");
  message.textContent = `${command}…`;
  message.dataset.ok = "";
  try {
    const reply = await fetch("/api/command", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ command }),
    });
    const body = await reply.json().catch(() => ({ ok: false, message: `HTTP ${reply.status}` }));
    message.textContent = body.message || command;
    message.dataset.ok = String(!!body.ok);
  } catch (err) {
    message.textContent = `${command}: ${err}`;
    message.dataset.ok = "false";
  }
}

document.addEventListener("click", (event) => {
  const b = event.target.closest("button");
  if (!b) return;
  if (b.id === "btn-load") return send(b.dataset.running === "true" ? "load stop" : "load start");
  if (b.dataset.cmd) return send(b.dataset.cmd);
  const { verb, part } = b.dataset;
  if (verb === "slow") return send(`slow ${part} ${$("#latency").value.trim()}`);
  if (verb === "flaky") return send(`flaky ${part} ${$("#error-rate").value.trim()}`);
  if (verb === "heal") return send(`heal ${part}`);
  if (verb) return send(`${verb} ${part}`);
});

function connect() {
  const status = $("#connection");
  const source = new EventSource("/api/events");
  source.addEventListener("state", (e) => {
    status.textContent = "live";
    status.dataset.state = "live";
    render(JSON.parse(e.data));
  });
  source.onerror = () => {
    status.textContent = "reconnecting…";
    status.dataset.state = "lost";
  };
}

fetch("/api/state").then((r) => r.json()).then(render).catch(() => {});
connect();
