// Start-up: ask for the API key when the server wants one, then the dashboard and the
// playground (tabs by URL hash: #dashboard, #playground).

import { forgetKey, getJSON, getKey, onUnauthorized, setKey } from "./api.js";
import { Dashboard } from "./dashboard.js";
import { $, setText } from "./dom.js";
import { Playground } from "./playground.js";

const connection = $("#connection");
const dashboard = new Dashboard($("#dashboard"), (ok, text) => {
  connection.dataset.ok = ok ? "yes" : "no";
  setText(connection, text);
});
const playground = new Playground($("#playground"));

function showTab() {
  const tab = location.hash === "#playground" ? "playground" : "dashboard";
  $("#dashboard").hidden = tab !== "dashboard";
  $("#playground").hidden = tab !== "playground";
  for (const link of document.querySelectorAll("nav a")) {
    if (link.hash === `#${tab}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (tab === "playground" && !$("#app").hidden) playground.show();
}

function askForKey() {
  const refused = Boolean(getKey());
  forgetKey();
  dashboard.stop();
  $("#app").hidden = true;
  $("#forget-key").hidden = true;
  $("#auth").hidden = false;
  setText($("#auth-error"), refused ? "The server refused this key." : "");
  $("#auth-key").focus();
}

async function start() {
  try {
    await getJSON("admin/status");
  } catch (err) {
    // A 401 has already brought the key form up (onUnauthorized), saying whether a key was refused.
    if (err.status === 401) return;
    // Other errors (the supervisor restarting, …): the dashboard shows them as it polls.
  }
  $("#auth").hidden = true;
  $("#app").hidden = false;
  $("#forget-key").hidden = !getKey();
  showTab();
  dashboard.start();
}

onUnauthorized(askForKey);
window.addEventListener("hashchange", showTab);
$("#auth-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("#auth-key").value.trim();
  if (!key) return;
  setKey(key, $("#auth-remember").checked);
  $("#auth-key").value = "";
  start();
});
$("#forget-key").addEventListener("click", () => {
  forgetKey();
  playground.reset();
  start();
});
document.addEventListener("visibilitychange", () => {
  if (!document.hidden && !$("#app").hidden) dashboard.tick();
});
start();
