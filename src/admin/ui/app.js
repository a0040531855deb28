// The operators' page: reads the admin API once a second (not while the tab is
// hidden) and draws routes, verdicts, rollouts, instances and the fleet. Changes go
// through the same admin API with the token typed into the page (kept in memory only)
// and Content-Type: application/json, after a confirmation.
"use strict";

const history = {}; // route name -> [{canaryErr, canaryP99, stableErr, stableP99}]
const HISTORY = 120; // two minutes of one-second samples
let paused = false;
let refreshing = false;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function pct(x) { return (100 * x).toFixed(2) + " %"; }
function ms(x) { return x.toFixed(1) + " ms"; }

function spark(values, label) {
  const w = 120, h = 24, max = Math.max(...values, 1e-9);
  const points = values.map((v, i) => `${(i * w) / Math.max(values.length - 1, 1)},${h - (v / max) * (h - 2) - 1}`).join(" ");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points);
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "currentColor");
  line.setAttribute("stroke-width", "1.5");
  svg.append(line);
  return svg;
}

function say(text, bad) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = bad ? "bad" : "ok";
}

async function change(method, path, body, what) {
  if (!window.confirm(`${what}?`)) return;
  const headers = { "Content-Type": "application/json" };
  const token = document.getElementById("token").value;
  if (token) headers["Authorization"] = "Bearer " + token;
  try {
    const response = await fetch(path, { method, headers, body: body ? JSON.stringify(body) : "" });
    const text = await response.text();
    let message = text;
    try { message = JSON.parse(text).error || `${what}: done`; } catch (_) {}
    say(response.ok ? `${what}: done` : `${what}: refused (${response.status}): ${message}`, !response.ok);
  } catch (error) {
    say(`${what}: ${error}`, true);
  }
  refresh();
}

function side(name, upstream, w, seconds, values, key) {
  const errs = values.map((v) => v[key + "Err"]);
  const p99s = values.map((v) => v[key + "P99"]);
  const rates = values.map((v) => v[key + "Rate"]);
  const rate = seconds > 0 ? w.requests / seconds : 0;
  return el("div", {},
    el("h4", { style: "margin:0" }, `${name}: ${upstream}`),
    el("div", {}, `${rate.toFixed(1)} requests/s `, spark(rates, `${name} request rate, last ${values.length} s`)),
    el("div", {}, `errors ${pct(w.error_rate)} (${w.errors} of ${w.requests}) `, spark(errs, `${name} error rate, last ${values.length} s`)),
    el("div", {}, `p50 ${ms(w.p50_ms)}, p99 ${ms(w.p99_ms)} `, spark(p99s, `${name} p99 latency, last ${values.length} s`)));
}

function drawRoute(route) {
  const h = (history[route.name] = history[route.name] || []);
  const seconds = route.window.seconds || 1;
  h.push({
    canaryErr: route.window.canary.error_rate, canaryP99: route.window.canary.p99_ms,
    stableErr: route.window.stable.error_rate, stableP99: route.window.stable.p99_ms,
    canaryRate: route.window.canary.requests / seconds, stableRate: route.window.stable.requests / seconds,
  });
  if (h.length > HISTORY) h.shift();
  const weight = route.canary_weight;
  const slo = route.slo;
  const state = slo ? slo.state : "none";
  const section = el("section", { class: "route", "aria-labelledby": `route-${route.name}` });
  section.append(el("h3", { id: `route-${route.name}` }, `Route ${route.name}`));
  section.append(el("div", {}, `Canary weight `, el("strong", { "data-weight": String(weight) }, `${weight} %`),
    route.canary ? ` (config file: ${route.file_weight} %)` : " (no canary)"));
  const bar = el("div", { class: "bar", role: "meter", "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": String(weight), "aria-label": `canary weight of ${route.name}` });
  bar.append(el("span", { style: `width:${weight}%` }));
  section.append(bar);
  if (slo) {
    const cls = state === "tripped" ? "bad" : "ok";
    const line = el("p", {}, "SLO: ", el("span", { class: cls, "data-slo": state }, state));
    if (slo.reason) line.append(` (${slo.reason}${slo.detail ? ": " + slo.detail : ""}${slo.at ? ", " + slo.at : ""})`);
    if (slo.dry_run) line.append(" (dry run)");
    section.append(line);
    const table = el("table", {}, el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "rule"), el("th", { scope: "col" }, "verdict"), el("th", { scope: "col" }, "evidence"))));
    const body = el("tbody");
    for (const rule of slo.rules || []) {
      const vcls = rule.verdict === "breach" ? "bad" : rule.verdict === "ok" ? "ok" : "warn";
      body.append(el("tr", {}, el("td", {}, rule.rule), el("td", { class: vcls }, rule.verdict), el("td", {}, rule.summary)));
    }
    table.append(body);
    // After a trip or a reset the judge starts over: no verdicts to list yet.
    if ((slo.rules || []).length) section.append(table);
  }
  const values = h;
  section.append(el("div", { class: "sides" },
    side("stable", route.stable, route.window.stable, seconds, values, "stable"),
    route.canary ? side("canary", route.canary, route.window.canary, seconds, values, "canary") : null));
  section.append(el("p", { class: "muted" }, `Figures over the last ${seconds} s (the SLO window); sparklines over the last ${values.length} s.`));
  if (route.recent_trips && route.recent_trips.length) {
    const list = el("ul", { "aria-label": `last trips of ${route.name}` });
    for (const trip of route.recent_trips) list.append(el("li", {}, `${trip.at}: ${trip.reason} (${trip.detail})`));
    section.append(el("div", {}, "Last trips (newest first):", list));
  }
  const rollout = route.rollout;
  if (rollout) {
    const steps = rollout.steps.map((s, i) => (s.pause ? "pause" : `${s.weight} %`) + (rollout.step === i + 1 ? " ◀" : "")).join(" → ");
    const next = rollout.next_step_in_s != null ? `, next step in ${Math.ceil(rollout.next_step_in_s)} s` : "";
    section.append(el("p", {}, `Rollout: ${rollout.state}${rollout.step ? ", step " + rollout.step : ""}${next}. Steps: ${steps}`));
  }
  if (route.canary) {
    const form = el("form", { class: "actions", onsubmit: (e) => e.preventDefault() });
    const input = el("input", { id: `w-${route.name}`, type: "number", min: "0", max: "100", step: "0.01", value: String(weight), size: "6" });
    const name = encodeURIComponent(route.name);
    form.append(
      el("label", { for: `w-${route.name}` }, "New weight (%)"), input,
      el("button", { type: "button", onclick: () => {
        const percent = Number(input.value);
        if (input.value.trim() === "" || !Number.isFinite(percent) || percent < 0 || percent > 100) {
          say(`A weight is a number from 0 to 100, not "${input.value}"`, true);
          return;
        }
        change("PUT", `/admin/routes/${name}/weight`, { canary_weight: percent }, `Set ${route.name} to ${percent} %`);
      } }, "Set weight"),
      el("button", { type: "button", onclick: () => change("POST", `/admin/routes/${name}/rollback`, null, `Roll ${route.name} back to 0 %`) }, "Rollback"),
      el("button", { type: "button", onclick: () => change("POST", `/admin/routes/${name}/reset`, null, `Reset the trip of ${route.name}`) }, "Reset trip"));
    if (rollout) {
      for (const action of ["start", "pause", "resume", "promote", "abort", "retry"]) {
        form.append(el("button", { type: "button", onclick: () => change("POST", `/admin/routes/${name}/rollout/${action}`, action === "start" ? { from_current: true } : {}, `Rollout ${action} on ${route.name}`) }, `Rollout ${action}`));
      }
    }
    section.append(form);
  }
  return section;
}

function drawUpstream(upstream) {
  const section = el("section", { class: "upstream", "aria-labelledby": `up-${upstream.name}` });
  section.append(el("h3", { id: `up-${upstream.name}` }, `Upstream ${upstream.name}`));
  const table = el("table", {}, el("thead", {}, el("tr", {}, ...["instance", "state", "health", "serving", "in flight", "ejections", "action"].map((t) => el("th", { scope: "col" }, t)))));
  const body = el("tbody");
  for (const i of upstream.instances) {
    const path = `/admin/upstreams/${encodeURIComponent(upstream.name)}/instances/${encodeURIComponent(i.addr)}/state`;
    const next = i.state === "ready" ? "drain" : "ready";
    body.append(el("tr", {},
      el("td", {}, i.addr), el("td", {}, i.state),
      el("td", { class: i.health === "down" ? "bad" : i.health === "up" ? "ok" : "" }, i.health + (i.last_error ? ` (${i.last_error})` : "")),
      el("td", { class: i.serving ? "ok" : "bad" }, i.serving ? "yes" : "no"),
      el("td", {}, i.in_flight), el("td", {}, i.ejections + (i.ejected ? " (ejected)" : "")),
      el("td", {}, el("button", { type: "button", onclick: () => change("PUT", path, { state: next }, `Set ${i.addr} of ${upstream.name} to ${next}`) }, next === "drain" ? "Drain" : "Ready"))));
  }
  table.append(body);
  section.append(table);
  return section;
}

function drawFleet(fleet) {
  if (!fleet || fleet.backend === "none") return el("p", { class: "muted" }, "Single node (no [fleet]).");
  const box = el("div");
  box.append(el("p", {}, `Cluster ${fleet.cluster}, this replica ${fleet.replica}; store `,
    el("span", { class: fleet.store_up ? "ok" : "bad" }, fleet.store_up ? "up" : "down"),
    `, applied revision ${fleet.applied_revision}; judging replica ${fleet.judge || "none"}.`));
  const members = fleet.members || [];
  if (members.length) {
    const table = el("table", {}, el("thead", {}, el("tr", {}, ...["replica", "applied revision", "store up"].map((t) => el("th", { scope: "col" }, t)))));
    const body = el("tbody");
    for (const m of members) body.append(el("tr", {}, el("td", {}, m.replica), el("td", {}, m.applied_revision), el("td", {}, m.store_up ? "yes" : "no")));
    table.append(body);
    box.append(table);
  }
  return box;
}

async function getJson(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

async function refresh() {
  // One at a time: a slow admin API must not stack reads (or sparkline samples).
  if (refreshing) return;
  refreshing = true;
  try {
    const [routes, upstreams, fleet] = await Promise.all([getJson("/admin/routes"), getJson("/admin/upstreams"), getJson("/admin/fleet")]);
    const tripped = routes.routes.filter((r) => r.slo && r.slo.state === "tripped").length;
    document.getElementById("summary").textContent =
      `${routes.routes.length} routes, ${tripped} tripped; config generation ${routes.generation}` + (routes.frozen ? `; rollouts frozen: ${routes.frozen.reason}` : "");
    const sections = routes.routes.map(drawRoute);
    // Not while the operator is typing into a field: redrawing would take it away.
    const active = document.activeElement;
    const busy = active && active.tagName === "INPUT" && active.closest("#routes, #upstreams");
    if (!busy) {
      document.getElementById("routes").replaceChildren(...sections);
      document.getElementById("upstreams").replaceChildren(...upstreams.upstreams.map(drawUpstream));
    }
    document.getElementById("fleet").replaceChildren(drawFleet(fleet));
  } catch (error) {
    document.getElementById("summary").textContent = `cannot read the admin API: ${error.message}`;
  } finally {
    refreshing = false;
  }
}

document.addEventListener("visibilitychange", () => { paused = document.hidden; });
refresh();
setInterval(() => { if (!paused) refresh(); }, 1000);
