// Eval view: a saved answers file judged by the server (POST /ui/api/eval), drawn as SVG bar charts, every answer readable.
import { api, el, errorText, fill, pct, svg } from "./dom.js";

const COLOURS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
const LIST_LIMIT = 400;
let data = null;

function colour(i) {
  return COLOURS[i % COLOURS.length];
}

// Grouped bars: one cluster per x label, one bar per config; `value(group, x)` is a share (0..1) or null.
function barChart(xs, value, onPick) {
  const groups = data.groups;
  const barW = Math.max(4, Math.min(18, Math.floor(120 / groups.length)));
  const cluster = Math.max(barW * groups.length + 16, 64);
  const left = 40, top = 10, height = 160;
  const width = left + cluster * xs.length + 10;
  const chart = svg("svg", { width, height: top + height + 40, viewBox: `0 0 ${width} ${top + height + 40}`, role: "img" });
  for (const tick of [0, 0.25, 0.5, 0.75, 1]) {
    const y = top + height * (1 - tick);
    chart.append(svg("line", { x1: left, x2: width - 5, y1: y, y2: y, class: "grid" }));
    chart.append(svg("text", { x: left - 4, y: y + 4, "text-anchor": "end", class: "tick" }, `${tick * 100}%`));
  }
  xs.forEach((x, xi) => {
    const x0 = left + xi * cluster + 8;
    groups.forEach((group, gi) => {
      const v = value(group, x);
      if (v === null || v === undefined) return;
      const h = Math.max(1, height * v);
      const bar = svg("rect", {
        x: x0 + gi * barW, y: top + height - h, width: barW - 1, height: h, fill: colour(gi), class: "bar",
        "data-config": group.label, "data-x": x, onclick: () => onPick(gi, x),
      }, svg("title", {}, `${group.label} · ${x}: ${pct(v)}`));
      chart.append(bar);
    });
    chart.append(svg("text", { x: x0 + (barW * groups.length) / 2, y: top + height + 16, "text-anchor": "middle", class: "label" }, x));
  });
  return chart;
}

function render() {
  fill(document.querySelector("#ev-summary tbody"), data.groups.map((g) => [
    g.label, g.seeds.join(", "), pct(g.loop_rate), pct(g.factual), pct(g.intended),
    (g.length_stops ?? 0).toFixed(0), (g.tokens ?? 0).toFixed(0), (g.cuts ?? 0).toFixed(0), String(g.errors),
  ]));
  document.getElementById("ev-legend").replaceChildren(...data.groups.map((g, i) =>
    el("span", { class: "key" }, el("span", { class: `swatch c${i % COLOURS.length}` }), g.label)));
  const looped = data.categories.filter((c) => !data.checked.includes(c));
  const share = (g, c) => (g.categories[c].answers ? g.categories[c].hits / g.categories[c].answers : null);
  document.getElementById("ev-chart-loops").replaceChildren(barChart(looped, share, pick));
  const checks = { factual: "fact", "intended rep.": "repeat" };
  const checkValue = (g, x) => (x === "factual" ? g.factual : g.intended);
  document.getElementById("ev-chart-checks").replaceChildren(
    barChart(Object.keys(checks), checkValue, (gi, x) => pick(gi, checks[x])));
  document.getElementById("ev-config").replaceChildren(el("option", { value: "", text: "all" }),
    ...data.groups.map((g, i) => el("option", { value: String(i), text: g.label })));
  document.getElementById("ev-category").replaceChildren(el("option", { value: "", text: "all" }),
    ...data.categories.map((c) => el("option", { value: c, text: c })));
  list();
  document.getElementById("ev-result").hidden = false;
}

function pick(groupIndex, category) {
  document.getElementById("ev-config").value = String(groupIndex);
  document.getElementById("ev-category").value = category;
  list();
}

function verdict(a) {
  if (a.error) return "error";
  if (a.loops) return "loops";
  if (a.correct === false) return "fails check";
  if (a.correct === true) return "passes";
  return "ok";
}

function list() {
  const config = document.getElementById("ev-config").value;
  const category = document.getElementById("ev-category").value;
  const bad = document.getElementById("ev-only-loops").checked;
  const shown = data.answers.filter((a) => (config === "" || a.group === Number(config)) &&
    (category === "" || a.category === category) && (!bad || a.loops || a.correct === false || a.error));
  document.getElementById("ev-count").textContent =
    `${shown.length} answers${shown.length > LIST_LIMIT ? ` (first ${LIST_LIMIT} listed)` : ""}`;
  document.getElementById("ev-list").replaceChildren(...shown.slice(0, LIST_LIMIT).map((a) => el("li", {},
    el("button", { type: "button", class: `answer-item v-${verdict(a).replace(" ", "-")}`, onclick: () => open(a) },
      `${data.groups[a.group].label} · seed ${a.seed} · ${a.id} · ${verdict(a)}`))));
}

function open(a) {
  const view = document.getElementById("ev-answer");
  const facts = `${data.groups[a.group].label}, seed ${a.seed}, ${a.category} (${a.split}) · finish ${a.finish ?? "–"} · ` +
    `stop ${a.stop_reason ?? "–"} · ${a.tokens} tokens · ${verdict(a)}`;
  view.replaceChildren(el("h3", { text: a.id }), el("p", { class: "note", text: facts }),
    el("p", { class: "prompt", text: a.prompt }), el("pre", { class: "answer-text", text: a.error || a.text }));
  view.hidden = false;
}

async function load(file) {
  const note = document.getElementById("ev-note");
  note.textContent = `judging ${file.name} …`;
  try {
    const response = await api("/ui/api/eval", {
      method: "POST", headers: { "Content-Type": "application/octet-stream" }, body: await file.arrayBuffer(),
    });
    if (!response.ok) {
      note.textContent = `${file.name}: ${await errorText(response)}`;
      return;
    }
    data = await response.json();
    note.textContent = `${file.name}: ${data.answers.length} answers, ${data.groups.length} configs`;
    render();
    document.body.dataset.evalLoaded = "1";
  } catch (error) {
    // a network failure, a file that cannot be read, a reply that is not the expected JSON: said, not left "judging"
    note.textContent = `${file.name}: ${error}`;
  }
}

export function startEval() {
  document.getElementById("ev-file").addEventListener("change", (event) => {
    const input = event.target;
    if (!input.files.length) return;
    const file = input.files[0];
    input.value = ""; // the same file chosen again (after fixing it) fires another change
    load(file);
  });
  for (const id of ["ev-config", "ev-category", "ev-only-loops"]) document.getElementById(id).addEventListener("change", list);
}
