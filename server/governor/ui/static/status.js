// Status view: /ui/api/status every 2 s while shown; tokens/s from the change in the gateway's output counter.
import { ago, api, banner, bytes, errorText, fill, pct } from "./dom.js";

const PERIOD_MS = 2000;
let last = null; // the previous snapshot's {time, output}

function render(s) {
  document.getElementById("st-model").textContent = s.model;
  const g = s.gateway;
  if (last && s.time > last.time) {
    const rate = (g.output_tokens_total - last.output) / (s.time - last.time);
    document.getElementById("st-tps").textContent = rate.toFixed(1);
  }
  last = { time: s.time, output: g.output_tokens_total };
  document.getElementById("st-running").textContent = g.running;
  document.getElementById("st-waiting").textContent = g.waiting;
  document.getElementById("st-requests").textContent = g.requests_total;
  document.getElementById("st-loops").textContent = g.loops_cut_total;
  fill(document.querySelector("#st-engines tbody"), s.engines.map((e) => [
    e.name, e.state, e.kind, String(e.restarts), e.version || "?", e.runner || "?", String(e.outstanding),
  ]));
  const adapters = s.adapters.map((a) => [
    a.name, a.state, a.tier, a.pinned ? "yes" : "no",
    // usage is sent to the admin key only
    "last_used" in a ? ago(a.last_used) : "–", "requests" in a ? String(a.requests) : "–", String(a.in_flight ?? 0),
    a.reason || "",
  ]);
  if (!adapters.length) adapters.push([s.lora ? "no adapters registered" : "LoRA is off", "", "", "", "", "", "", ""]);
  fill(document.querySelector("#st-adapters tbody"), adapters);
  const gpus = s.gpus.map((d) => [
    d.index, d.name, pct(d.utilization), `${bytes(d.memory_used_bytes)} / ${bytes(d.memory_total_bytes)}`,
  ]);
  if (!gpus.length) gpus.push(["–", "no GPU readings (NVML)", "", ""]);
  fill(document.querySelector("#st-gpus tbody"), gpus);
  document.getElementById("st-updated").textContent = `updated ${new Date(s.time * 1000).toLocaleTimeString()}`;
}

async function poll() {
  if (document.body.dataset.view === "status" && !document.hidden) {
    try {
      const response = await api("/ui/api/status");
      if (response.ok) {
        render(await response.json());
        document.body.dataset.statusLoaded = "1";
      } else if (response.status !== 401) {
        banner(`Status: ${await errorText(response)}`);
      }
    } catch (error) {
      banner(`Status: ${error}`);
    }
  }
  setTimeout(poll, PERIOD_MS);
}

export function startStatus() {
  poll();
}
