// The page's shell: the key form, the tabs (by URL hash), and each view started when first shown.
import { banner, getKey, setKey } from "./dom.js";
import { startStatus } from "./status.js";
import { startPlayground } from "./playground.js";
import { startEval } from "./evalview.js";

const starters = { status: startStatus, playground: startPlayground, eval: startEval };
const started = new Set();

function show() {
  const name = (location.hash || "#status").slice(1);
  const view = starters[name] ? name : "status";
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.view === view);
  if (!started.has(view)) {
    started.add(view);
    starters[view]();
  }
  document.body.dataset.view = view;
}

function keyForm() {
  const input = document.getElementById("key");
  input.value = getKey();
  document.getElementById("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setKey(input.value.trim());
    banner("");
  });
  document.getElementById("key-forget").addEventListener("click", () => {
    input.value = "";
    setKey("");
  });
}

keyForm();
window.addEventListener("hashchange", show);
show();
