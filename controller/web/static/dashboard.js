/* slmfleet dashboard: live fragments by polling, confirmation of dangerous actions. No library needed. */
(function () {
  "use strict";

  /* Shared by the chart scripts: fetch JSON from url and draw it now and every `every` ms while the page is
     visible (`first`: data the page came with, drawn without a request); keep `plots` sized to their boxes. */
  window.slmfCharts = {
    follow: function (url, every, draw, first) {
      function load() {
        if (document.hidden) { window.setTimeout(load, every); return; }
        if (first) {
          var data = first;
          first = null;
          draw(data);
          window.setTimeout(load, every);
          return;
        }
        fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
          .then(function (r) { return r.ok ? r.json() : null; })
          .then(function (data) { if (data) { draw(data); } })
          .catch(function () { /* the controller restarts or the network blinks: try again next time */ })
          .then(function () { window.setTimeout(load, every); });
      }
      load();
    },
    resizing: function (box, plots) {
      window.addEventListener("resize", function () {
        Object.keys(plots).forEach(function (k) {
          var el = box.querySelector('[data-chart="' + k + '"]');
          plots[k].setSize({ width: Math.max(280, el.clientWidth), height: 220 });
        });
      });
    }
  };

  /* Elements with data-poll="URL" are refreshed from that URL every data-every ms while the page is
     visible; polling stops once the fragment carries data-final (a finished rollout). */
  function poll(el) {
    var url = el.getAttribute("data-poll");
    var every = parseInt(el.getAttribute("data-every"), 10) || 2000;
    var busy = false;

    function finished() { return el.querySelector("[data-final]") !== null; }

    function schedule() { if (!finished()) { window.setTimeout(tick, every); } }

    function tick() {
      if (document.hidden || busy) { schedule(); return; }
      busy = true;
      fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html", "X-Slmf-Fragment": "1" } })
        .then(function (r) {
          if (r.status === 401) {
            window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname));
            return null;
          }
          return r.ok ? r.text() : null;
        })
        .then(function (html) {
          if (html !== null && html !== undefined) {
            el.innerHTML = html;
            el.setAttribute("data-updated", new Date().toISOString());
            el.dispatchEvent(new CustomEvent("slmf:updated", { bubbles: true }));
          }
        })
        .catch(function () { /* the controller restarts or the network blinks: try again next time */ })
        .then(function () { busy = false; schedule(); });
    }
    schedule();
  }

  /* The action buttons live outside the polled fragment (so a half-typed reason survives a refresh);
     the fragment says which actions the rollout's state accepts now. */
  function syncActions() {
    var live = document.querySelector("[data-actions]");
    var form = document.querySelector("form.actions");
    if (!live || !form) { return; }
    var allowed = (live.getAttribute("data-actions") || "").split(",").filter(Boolean);
    var buttons = form.querySelectorAll("button[data-action]");
    for (var i = 0; i < buttons.length; i++) {
      buttons[i].hidden = allowed.indexOf(buttons[i].getAttribute("data-action")) < 0;
    }
    var none = form.querySelector(".no-actions");
    if (none) { none.hidden = allowed.length > 0; }
    var reason = form.querySelector("input[name=reason]");
    if (reason) { reason.hidden = allowed.length === 0; }
  }

  /* A selector field with data-count-url says, as one types, how many devices it matches now. */
  function countMatches(input) {
    var out = document.getElementById(input.getAttribute("data-count-target"));
    var timer = null;
    function update() {
      var value = input.value.trim();
      if (!value) { out.textContent = ""; return; }
      fetch(input.getAttribute("data-count-url") + "?selector=" + encodeURIComponent(value),
            { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (data) {
          if (data && input.value.trim() === value) {
            out.textContent = data.error ? data.error : data.matching.toLocaleString("en") + " devices match now.";
          }
        })
        .catch(function () { /* keep the last answer */ });
    }
    input.addEventListener("input", function () { window.clearTimeout(timer); timer = window.setTimeout(update, 250); });
  }

  function confirmDangerous(event) {
    var button = event.submitter;
    var question = button && button.getAttribute("data-confirm");
    if (question && !window.confirm(question)) { event.preventDefault(); }
  }

  document.addEventListener("DOMContentLoaded", function () {
    var polled = document.querySelectorAll("[data-poll]");
    for (var i = 0; i < polled.length; i++) { poll(polled[i]); }
    var counted = document.querySelectorAll("input[data-count-url]");
    for (var j = 0; j < counted.length; j++) { countMatches(counted[j]); }
    document.addEventListener("slmf:updated", syncActions);
    document.addEventListener("submit", confirmDangerous);
    syncActions();
  });
})();
